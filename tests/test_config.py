"""Configuration loading: defaults, every kind of error with its key path, all at once."""

import textwrap

import pytest

from stickyproxy import config
from stickyproxy.config import ConfigError, loads

MINIMAL = """
[[backends]]
id = "app-1"
url = "http://127.0.0.1:9001"
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        loads(textwrap.dedent(text))
    return exc.value.errors


def test_minimal_config_gets_declared_defaults():
    cfg = loads(MINIMAL)
    assert cfg.listen.port == config.Listen().port == 8080
    assert cfg.routing.vnodes == 160
    assert cfg.routing.no_key == "round-robin"
    assert [s.describe() for s in cfg.routing.keys] == ["header X-User-Id"]
    assert cfg.backends[0].host == "127.0.0.1" and cfg.backends[0].port == 9001
    assert cfg.timeouts.connect == 1.0
    assert cfg.headers.key == "X-Sticky-Key"


def test_example_config_is_valid():
    cfg = config.load("config/example.toml")
    assert [b.id for b in cfg.backends] == ["app-1", "app-2", "app-3"]
    assert [s.kind for s in cfg.routing.keys] == ["header", "cookie", "query", "path"]


def test_settings_are_immutable():
    cfg = loads(MINIMAL)
    with pytest.raises(AttributeError):
        cfg.listen.port = 1  # type: ignore[misc]


def test_durations_and_sizes():
    cfg = loads(MINIMAL + """
[timeouts]
connect = "250ms"
response = "1.5m"
[limits]
max_header_bytes = "32KiB"
max_body = 1000
""")
    assert cfg.timeouts.connect == 0.25
    assert cfg.timeouts.response == 90.0
    assert cfg.limits.max_header_bytes == 32768
    assert cfg.limits.max_body == 1000


@pytest.mark.parametrize("text, expected", [
    ('[[backends]]\nid = "a"\nurl = "ftp://x"\n', "backends[0].url: not an http URL: 'ftp://x'"),
    ('[[backends]]\nid = "a"\nurl = "http://h/path"\n', "backends[0].url: must be scheme://host[:port]"),
    ('[[backends]]\nid = "a"\nurl = "http://h:99999"\n', "backends[0].url: not a valid URL"),
    ('[[backends]]\nid = "a b"\nurl = "http://h"\n', "backends[0].id: must be 1-64"),
    ('[[backends]]\nurl = "http://h"\n', "backends[0].id: missing"),
    ('[[backends]]\nid = "a"\n', "backends[0].url: missing"),
    ('[[backends]]\nid = "a"\nurl = "http://h"\nweight = 0\n', "backends[0].weight: must be between 1 and 100"),
    ('[[backends]]\nid = "a"\nurl = "http://h"\nweight = "2"\n', "backends[0].weight: expected an integer"),
    ('[[backends]]\nid = "a"\nurl = "http://h"\nport = 1\n', "backends[0].port: unknown key"),
    ('backends = []\n', "backends: at least one"),
    ('[listen]\nport = 8080\n', "backends: at least one"),
    (MINIMAL + '[listen]\nport = "80"\n', "listen.port: expected an integer"),
    (MINIMAL + '[listen]\nport = 70000\n', "listen.port: must be between 0 and 65535"),
    (MINIMAL + '[listen]\ntrusted_proxies = ["10.0.0.0/8", "nope"]\n', "listen.trusted_proxies: not an IP address"),
    (MINIMAL + '[timeouts]\nconnect = "5"\n', "timeouts.connect: not a duration"),
    (MINIMAL + '[timeouts]\nconnect = 5\n', "timeouts.connect: expected a duration string"),
    (MINIMAL + '[timeouts]\nconnect = "0ms"\n', "timeouts.connect: must be at least"),
    (MINIMAL + '[limits]\nmax_body = "lots"\n', "limits.max_body: not a size"),
    (MINIMAL + '[routing]\nno_key = "drop"\n', "routing.no_key: must be one of"),
    (MINIMAL + '[routing]\nvnodes = 0\n', "routing.vnodes: must be between"),
    (MINIMAL + '[routing]\nkeys = []\n', "routing.keys: needs at least one"),
    (MINIMAL + '[routing]\nkeys = [{ from = "smoke", name = "x" }]\n', "routing.keys[0].from: must be one of"),
    (MINIMAL + '[routing]\nkeys = [{ from = "header" }]\n', "routing.keys[0].name: expected a string"),
    (MINIMAL + '[routing]\nkeys = [{ from = "header", name = "Bad Name" }]\n', "routing.keys[0].name: not a valid header name"),
    (MINIMAL + '[routing]\nkeys = [{ from = "path", pattern = "^/u/(.*)" }]\n', "routing.keys[0].pattern: needs a named group"),
    (MINIMAL + '[routing]\nkeys = [{ from = "path", pattern = "(?P<key>" }]\n', "routing.keys[0].pattern: not a valid regular expression"),
    (MINIMAL + '[routing]\nkeys = [{ from = "cookie", name = "u", extra = 1 }]\n', "routing.keys[0].extra: unknown key"),
    (MINIMAL + '[health]\nexpect = "2xx"\n', "health.expect: expected a status or range"),
    (MINIMAL + '[health]\ninterval = "1s"\ntimeout = "2s"\n', "health.timeout: must not exceed health.interval"),
    (MINIMAL + '[nonsense]\nx = 1\n', "nonsense: unknown section"),
    ('listen = 3\n' + MINIMAL, "listen: expected a table"),
    (MINIMAL + '[admin]\ntoken = "a"\ntoken_env = "B"\n', "admin.token_env: set either"),
    (MINIMAL + '[admin]\ntoken_env = "STICKYPROXY_SURELY_UNSET_VAR"\n', "admin.token_env: environment variable"),
    ('x = [\n', "TOML syntax error"),
    (MINIMAL + '[admin]\nhost = "0.0.0.0"\n', "admin.token: required when admin.host is not a loopback"),
])
def test_each_error_names_its_key_path(text, expected):
    errs = errors_of(text)
    assert any(e.startswith(expected) for e in errs), errs


def test_toml_syntax_error_gives_the_line():
    errs = errors_of('[listen]\nport = 80\n[[backends]\nid = "x"\n')
    assert "line 3" in errs[0]


def test_duplicate_ids_and_urls():
    errs = errors_of("""
        [[backends]]
        id = "a"
        url = "http://h:1"
        [[backends]]
        id = "a"
        url = "http://h:2"
        [[backends]]
        id = "c"
        url = "http://H:1/"
    """)
    assert "backends[1].id: duplicate of backends[0].id 'a'" in errs
    assert "backends[2].url: duplicate of backends[0].url 'http://H:1/'" in errs


def test_every_error_is_reported_at_once():
    errs = errors_of("""
        [listen]
        port = "x"
        [timeouts]
        connect = "fast"
        [[backends]]
        id = "a"
        url = "ftp://x"
    """)
    assert len(errs) == 3
    assert {e.split(":")[0] for e in errs} == {"listen.port", "timeouts.connect", "backends[0].url"}


def test_admin_on_loopback_or_with_token():
    assert loads(MINIMAL + '[admin]\nhost = "::1"\n').admin.host == "::1"
    assert loads(MINIMAL + '[admin]\nhost = "0.0.0.0"\ntoken = "t"\n').admin.token == "t"
    assert loads(MINIMAL + '[admin]\nhost = "0.0.0.0"\nenabled = false\n').admin.enabled is False


def test_token_from_environment(monkeypatch):
    monkeypatch.setenv("SP_TEST_TOKEN", "s3cret")
    cfg = loads(MINIMAL + '[admin]\ntoken_env = "SP_TEST_TOKEN"\n')
    assert cfg.admin.token == "s3cret"


def test_load_reports_unreadable_file(tmp_path):
    with pytest.raises(ConfigError) as exc:
        config.load(tmp_path / "missing.toml")
    assert "cannot read" in exc.value.render()


def test_configuration_reference_is_current():
    with open("docs/configuration.md") as f:
        assert f.read().strip() == config.reference_markdown().strip(), \
            "regenerate with: python -m stickyproxy.config > docs/configuration.md"
