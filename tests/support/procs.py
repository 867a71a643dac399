"""What /proc says about processes: descendants, liveness, and the TCP sockets a process
holds (listening, or connected to given ports). Linux only, like the proxy's worker mode."""

from __future__ import annotations

import os


def descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc/*/stat parent links)."""
    parents: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents[int(d)] = ppid
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        nxt = {p for p, pp in parents.items() if pp in frontier and p not in out}
        out |= nxt
        frontier = nxt
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def socket_inodes(pid: int) -> set[str]:
    out = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                out.add(target[8:-1])
    except OSError:
        pass
    return out


def _tcp_rows():
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            yield parts[1], parts[2], parts[3], parts[9]  # local, remote, state, inode


def listening_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a listening TCP socket on ``port``."""
    inodes = socket_inodes(pid)
    return any(
        state == "0A" and inode in inodes and int(local.split(":")[1], 16) == port
        for local, _, state, inode in _tcp_rows()
    )


def listeners(port: int) -> int:
    """Listening TCP sockets on ``port`` (SO_REUSEPORT: one per worker)."""
    return sum(
        1
        for local, _, state, _ in _tcp_rows()
        if state == "0A" and int(local.split(":")[1], 16) == port
    )


def established_to(pid: int, ports: set[int]) -> int:
    """TCP connections process ``pid`` holds to 127.0.0.1 on one of ``ports``."""
    inodes = socket_inodes(pid)
    return sum(
        1
        for _, remote, state, inode in _tcp_rows()
        if state == "01" and inode in inodes and int(remote.split(":")[1], 16) in ports
    )
