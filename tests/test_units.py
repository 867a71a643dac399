import pytest

from stickyproxy.units import format_duration, parse_duration, parse_size


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("2s", 2.0),
        ("500ms", 0.5),
        ("1.5m", 90.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        (" 3 s ", 3.0),
        ("0s", 0.0),
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "2 sec", "-1s", "1w", "s", "1e3s"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    "value, size",
    [
        (0, 0),
        (1024, 1024),
        ("64KiB", 65536),
        ("1MiB", 1 << 20),
        ("2GiB", 2 << 30),
        ("10MB", 10_000_000),
        ("5", 5),
        ("7B", 7),
    ],
)
def test_sizes(value, size):
    assert parse_size(value) == size


@pytest.mark.parametrize("value", [-1, "1.5MiB", "lots", "1TiB", True])
def test_bad_sizes(value):
    with pytest.raises(ValueError):
        parse_size(value)


def test_format_duration():
    assert format_duration(0.25) == "250ms"
    assert format_duration(2) == "2s"
