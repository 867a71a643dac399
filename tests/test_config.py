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
    cfg = loads(
        MINIMAL
        + """
[timeouts]
connect = "250ms"
response = "1.5m"
[limits]
max_header_bytes = "32KiB"
max_body = 1000
"""
    )
    assert cfg.timeouts.connect == 0.25
    assert cfg.timeouts.response == 90.0
    assert cfg.limits.max_header_bytes == 32768
    assert cfg.limits.max_body == 1000


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            '[[backends]]\nid = "a"\nurl = "ftp://x"\n',
            "backends[0].url: not an http:// or https:// URL: 'ftp://x'",
        ),
        (
            '[[backends]]\nid = "a"\nurl = "http://h/path"\n',
            "backends[0].url: must be scheme://host[:port]",
        ),
        ('[[backends]]\nid = "a"\nurl = "http://h:99999"\n', "backends[0].url: not a valid URL"),
        ('[[backends]]\nid = "a b"\nurl = "http://h"\n', "backends[0].id: must be 1-64"),
        ('[[backends]]\nurl = "http://h"\n', "backends[0].id: missing"),
        ('[[backends]]\nid = "a"\n', "backends[0].url: missing"),
        (
            '[[backends]]\nid = "a"\nurl = "http://h"\nweight = 0\n',
            "backends[0].weight: must be between 1 and 100",
        ),
        (
            '[[backends]]\nid = "a"\nurl = "http://h"\nweight = "2"\n',
            "backends[0].weight: expected an integer",
        ),
        ('[[backends]]\nid = "a"\nurl = "http://h"\nport = 1\n', "backends[0].port: unknown key"),
        ("backends = []\n", "backends: at least one"),
        ("[listen]\nport = 8080\n", "backends: at least one"),
        (MINIMAL + '[listen]\nport = "80"\n', "listen.port: expected an integer"),
        (MINIMAL + "[listen]\nport = 70000\n", "listen.port: must be between 0 and 65535"),
        (
            MINIMAL + '[listen]\ntrusted_proxies = ["10.0.0.0/8", "nope"]\n',
            "listen.trusted_proxies: not an IP address",
        ),
        (MINIMAL + '[timeouts]\nconnect = "5"\n', "timeouts.connect: not a duration"),
        (MINIMAL + "[timeouts]\nconnect = 5\n", "timeouts.connect: expected a duration string"),
        (MINIMAL + '[timeouts]\nconnect = "0ms"\n', "timeouts.connect: must be at least"),
        (MINIMAL + '[limits]\nmax_body = "lots"\n', "limits.max_body: not a size"),
        (MINIMAL + '[routing]\nno_key = "drop"\n', "routing.no_key: must be one of"),
        (MINIMAL + "[routing]\nvnodes = 0\n", "routing.vnodes: must be between"),
        (MINIMAL + "[routing]\nkeys = []\n", "routing.keys: needs at least one"),
        (
            MINIMAL + '[routing]\nkeys = [{ from = "smoke", name = "x" }]\n',
            "routing.keys[0].from: must be one of",
        ),
        (
            MINIMAL + '[routing]\nkeys = [{ from = "header" }]\n',
            "routing.keys[0].name: expected a string",
        ),
        (
            MINIMAL + '[routing]\nkeys = [{ from = "header", name = "Bad Name" }]\n',
            "routing.keys[0].name: not a valid header name",
        ),
        (
            MINIMAL + '[routing]\nkeys = [{ from = "path", pattern = "^/u/(.*)" }]\n',
            "routing.keys[0].pattern: needs a named group",
        ),
        (
            MINIMAL + '[routing]\nkeys = [{ from = "path", pattern = "(?P<key>" }]\n',
            "routing.keys[0].pattern: not a valid regular expression",
        ),
        (
            MINIMAL + '[routing]\nkeys = [{ from = "cookie", name = "u", extra = 1 }]\n',
            "routing.keys[0].extra: unknown key",
        ),
        (MINIMAL + '[health]\nexpect = "2xx"\n', "health.expect: expected a status or range"),
        (
            MINIMAL + '[health]\ninterval = "1s"\ntimeout = "2s"\n',
            "health.timeout: must not exceed health.interval",
        ),
        (MINIMAL + "[nonsense]\nx = 1\n", "nonsense: unknown section"),
        ("listen = 3\n" + MINIMAL, "listen: expected a table"),
        (MINIMAL + '[admin]\ntoken = "a"\ntoken_env = "B"\n', "admin.token_env: set either"),
        (
            MINIMAL + '[admin]\ntoken_env = "STICKYPROXY_SURELY_UNSET_VAR"\n',
            "admin.token_env: environment variable",
        ),
        ("x = [\n", "TOML syntax error"),
        (
            MINIMAL + '[admin]\nhost = "0.0.0.0"\n',
            "admin.token: required when admin.host is not a loopback",
        ),
    ],
)
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
        assert f.read().strip() == config.reference_markdown().strip(), (
            "regenerate with: python -m stickyproxy.config > docs/configuration.md"
        )


# -- parse is pure; resolve reads the environment and key files --------------------------

JWT_HS = """
[admin]
host = "0.0.0.0"
token_env = "SP_TEST_ADMIN"
[routing]
keys = [{ from = "jwt", algorithms = ["HS256"], secret_env = "SP_TEST_JWT" }]
[[backends]]
id = "a"
url = "http://127.0.0.1:1"
"""


def test_parse_reads_neither_environment_nor_files(monkeypatch, tmp_path):
    import tomllib

    monkeypatch.setenv("SP_TEST_ADMIN", "t0ken")
    monkeypatch.setenv("SP_TEST_JWT", "s3cret")
    cfg = config.parse(tomllib.loads(JWT_HS))
    assert cfg.admin.token == ""  # not looked up
    (src,) = cfg.routing.keys
    assert src.settings.secret_env == "SP_TEST_JWT" and src.jwt is None
    pem = tmp_path / "missing.pem"  # a key file that does not exist
    cfg = config.parse(
        tomllib.loads(
            JWT_HS.replace(
                'algorithms = ["HS256"], secret_env = "SP_TEST_JWT"',
                f'algorithms = ["RS256"], public_key_file = "{pem}"',
            )
        )
    )
    assert cfg.routing.keys[0].jwt is None


@pytest.mark.parametrize(
    "env, secrets, problems",
    [
        ({"SP_TEST_ADMIN": "t", "SP_TEST_JWT": "s"}, True, []),
        (
            {"SP_TEST_JWT": "s"},
            True,
            [
                "admin.token_env: environment variable 'SP_TEST_ADMIN' is unset",
                "admin.token: required",
            ],
        ),
        (
            {"SP_TEST_ADMIN": "t"},
            True,
            ["routing.keys[0].secret_env: environment variable 'SP_TEST_JWT' is unset"],
        ),
        ({}, False, []),  # check/route/plan need no secret
    ],
)
def test_resolve_reads_the_named_environment(env, secrets, problems):
    import tomllib

    cfg = config.parse(tomllib.loads(JWT_HS))
    if not problems:
        out = config.resolve(cfg, secrets=secrets, environ=env)
        assert out.admin.token == env.get("SP_TEST_ADMIN", "") if secrets else out.admin.token == ""
        assert out.routing.keys[0].jwt is not None
        return
    with pytest.raises(ConfigError) as e:
        config.resolve(cfg, secrets=secrets, environ=env)
    assert len(e.value.errors) == len(problems)
    for got, want in zip(e.value.errors, problems):
        assert got.startswith(want), got


def test_resolve_reads_key_files_through_the_given_reader(tmp_path):
    import tomllib

    cfg = config.parse(
        tomllib.loads(
            JWT_HS.replace(
                'algorithms = ["HS256"], secret_env = "SP_TEST_JWT"',
                'algorithms = ["RS256"], public_key_file = "/keys/k.pem"',
            ).replace('host = "0.0.0.0"\ntoken_env = "SP_TEST_ADMIN"', "enabled = false")
        )
    )
    copies = config.FileCopies({})  # serves nothing: unreadable
    with pytest.raises(ConfigError, match=r"routing.keys\[0\].public_key_file: cannot read"):
        config.resolve(cfg, read_file=copies.read)


# -- settings from the environment ---------------------------------------------------------

ENV_BASE = '[admin]\nenabled = false\n[[backends]]\nid = "a"\nurl = "http://127.0.0.1:1"\n'


@pytest.mark.parametrize(
    "env, check",
    [
        ({"STICKYPROXY_LISTEN__PORT": "8181"}, lambda c: c.listen.port == 8181),
        ({"stickyproxy_listen__port": "8181"}, lambda c: c.listen.port == 8181),
        ({"STICKYPROXY_ROUTING__NO_KEY": "reject"}, lambda c: c.routing.no_key == "reject"),
        ({"STICKYPROXY_HEALTH__ENABLED": "false"}, lambda c: c.health.enabled is False),
        ({"STICKYPROXY_TIMEOUTS__CONNECT": "250ms"}, lambda c: c.timeouts.connect == 0.25),
        ({"STICKYPROXY_TIMEOUTS__CONNECT": '"250ms"'}, lambda c: c.timeouts.connect == 0.25),
        (
            {"STICKYPROXY_LISTEN__TRUSTED_PROXIES": '["10.0.0.0/8"]'},
            lambda c: [str(n) for n in c.listen.trusted_proxies] == ["10.0.0.0/8"],
        ),
        # the build's own variables have no double underscore: not settings
        ({"STICKYPROXY_COMPILE": "1"}, lambda c: c.listen.port == 8080),
    ],
)
def test_the_environment_overrides_the_file(env, check):
    assert check(loads(ENV_BASE, environ=env))


@pytest.mark.parametrize(
    "env, error",
    [
        ({"STICKYPROXY_LISTEN__PORT": "0x"}, "listen.port: "),
        ({"STICKYPROXY_LISTEN__PROT": "8080"}, "listen.prot: unknown key"),
        ({"STICKYPROXY_BACKENDS__URL": "x"}, "STICKYPROXY_BACKENDS__URL: [[backends]] cannot"),
        ({"STICKYPROXY_ADMIN__ENABLED__X": "1"}, "admin.enabled.x is not inside a table"),
    ],
)
def test_an_environment_override_error_names_the_variable(env, error):
    with pytest.raises(ConfigError) as e:
        loads(ENV_BASE, environ=env)
    (msg,) = [m for m in e.value.errors if error in m]
    assert next(iter(env)) in msg
