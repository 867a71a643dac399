"""The file source on a real file system: atomic renames, a Kubernetes ConfigMap's symlink
swap, half-written and invalid content, a missing file."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from stickyproxy.discovery import FileSource, parse_discovery

from .conftest import Watching


def entries(*ids: str) -> list[dict]:
    return [{"id": i, "url": f"http://127.0.0.1:{8000 + n}"} for n, i in enumerate(ids)]


def source(path: Path, settle: str = "100ms", share: float = 0.5) -> FileSource:
    return FileSource(
        parse_discovery(
            {
                "settle": settle,
                "max_drop_share": share,
                "file": {"path": str(path), "interval": "50ms"},
            }
        )
    )


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def test_atomic_renames_are_seen(tmp_path):
    path = tmp_path / "backends.json"
    write_atomically(path, json.dumps(entries("a", "b")))
    async with Watching(source(path)) as w:
        assert await w.next() == ("a", "b")
        write_atomically(path, json.dumps(entries("a", "b", "c")))
        assert await w.next() == ("a", "b", "c")
        write_atomically(path, json.dumps({"backends": entries("a", "b")}))
        assert await w.next() == ("a", "b")


async def test_a_configmap_symlink_swap_is_seen(tmp_path):
    """The kubelet's update: files live in ``..<timestamp>/``, ``..data`` points at the current
    one, the visible name points through ``..data``; an update re-points ``..data`` by rename."""
    cm = tmp_path / "config"
    cm.mkdir()

    def version(name: str, ids: tuple[str, ...]) -> None:
        d = cm / name
        d.mkdir()
        (d / "backends.toml").write_text(
            "".join(f'[[backends]]\nid = "{e["id"]}"\nurl = "{e["url"]}"\n' for e in entries(*ids))
        )
        os.symlink(name, cm / "..data_tmp")
        os.replace(cm / "..data_tmp", cm / "..data")

    version("..2026_12_04_21_00_00.1", ("a", "b"))
    os.symlink("..data/backends.toml", cm / "backends.toml")
    async with Watching(source(cm / "backends.toml")) as w:
        assert await w.next() == ("a", "b")
        version("..2026_12_04_21_05_00.2", ("a", "b", "c"))
        assert await w.next() == ("a", "b", "c")


async def test_invalid_and_half_written_content_is_refused_and_the_set_kept(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "stickyproxy.discovery")
    path = tmp_path / "backends.json"
    path.write_text(json.dumps(entries("a", "b")))
    src = source(path)
    async with Watching(src) as w:
        assert await w.next() == ("a", "b")
        full = json.dumps(entries("a", "b", "c"))
        path.write_text(full[: len(full) // 2])  # a writer caught mid-write
        await w.rounds(4)
        assert src.stats.failures >= 4 and [b.id for b in src.current] == ["a", "b"]
        assert any(
            str(path) in r.getMessage() and "JSON syntax error" in r.getMessage()
            for r in caplog.records
        )
        path.write_text(json.dumps([{"id": "a", "url": "ftp://x"}]))
        await w.rounds(2)
        assert "backends[0].url: not an http:// or https:// URL" in caplog.text
        path.write_text(full)
        assert await w.next() == ("a", "b", "c")
    assert w.applied.empty()


async def test_a_missing_file_keeps_the_set_and_is_read_again_when_back(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "stickyproxy.discovery")
    path = tmp_path / "backends.json"
    path.write_text(json.dumps(entries("a", "b")))
    src = source(path)
    async with Watching(src) as w:
        assert await w.next() == ("a", "b")
        path.unlink()
        await w.rounds(3)
        assert src.stats.last_error.startswith(f"{path}: cannot read: No such file")
        assert [b.id for b in src.current] == ["a", "b"]
        path.write_text(json.dumps(entries("a", "b", "d")))
        assert await w.next() == ("a", "b", "d")


async def test_an_empty_list_and_a_large_drop_are_refused(tmp_path):
    path = tmp_path / "backends.json"
    path.write_text(json.dumps(entries("a", "b", "c", "d")))
    src = source(path)
    async with Watching(src) as w:
        assert await w.next() == ("a", "b", "c", "d")
        write_atomically(path, "[]")
        await w.rounds(4)
        assert src.stats.refusing and src.stats.refused == 1
        write_atomically(path, json.dumps(entries("a")))
        await w.rounds(6)  # settled, then refused
        assert src.stats.refusing and src.stats.refused == 2
        assert [b.id for b in src.current] == ["a", "b", "c", "d"]
    assert w.applied.empty()
