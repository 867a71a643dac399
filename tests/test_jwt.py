"""JWT key sources: pinned algorithms, key material, claims checks, fall-through."""

import base64
import hashlib
import hmac
import json
import textwrap
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from stickyproxy.config import ConfigError, KeySource, loads
from stickyproxy.routing.jwtkeys import InvalidToken, JwtSettings, bearer_token, load_verifier
from stickyproxy.routing.keys import KeyExtractor, KeyRejected

BACKEND = '\n[[backends]]\nid = "a"\nurl = "http://127.0.0.1:1"\n'
NOW = 1_800_000_000


def rsa_pair():
    priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub_pem = priv.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    priv_pem = priv.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return priv, priv_pem, pub_pem


@pytest.fixture(scope="module")
def keys():
    return rsa_pair(), rsa_pair()


@pytest.fixture
def hs(monkeypatch):
    monkeypatch.setenv("SP_JWT_SECRET", "x" * 32)
    return load_verifier(JwtSettings(algorithms=("HS256",), secret_env="SP_JWT_SECRET"))


def forge_hs256(claims, secret: bytes) -> str:
    """An HS256 token made by hand (PyJWT refuses to use a PEM key as an HMAC secret)."""

    def b64(b: bytes) -> bytes:
        return base64.urlsafe_b64encode(b).rstrip(b"=")

    signing = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(json.dumps(claims).encode())
    sig = hmac.new(secret, signing, hashlib.sha256).digest()
    return (signing + b"." + b64(sig)).decode()


def hs_token(claims, secret="x" * 32, alg="HS256", headers=None):
    return jwt.encode(claims, secret, algorithm=alg, headers=headers)


def test_hs256_valid_token_yields_the_claim(hs):
    assert hs.verify(hs_token({"sub": "alice", "exp": NOW + 60}), now=NOW) == "alice"


@pytest.mark.parametrize(
    "claims, now, reason",
    [
        ({"sub": "a", "exp": NOW - 1}, NOW, "expired"),
        ({"sub": "a", "exp": NOW + 60, "nbf": NOW + 30}, NOW, "not yet valid"),
        ({"sub": "a"}, NOW, "lacks the exp claim"),
        ({"exp": NOW + 60}, NOW, "no usable sub claim"),
        ({"sub": "", "exp": NOW + 60}, NOW, "no usable sub claim"),
    ],
)
def test_claim_checks(hs, claims, now, reason):
    with pytest.raises(InvalidToken, match=reason):
        # the time checks of PyJWT use the real clock: shift claims to it
        shift = int(time.time()) - NOW
        c = {k: (v + shift if k in ("exp", "nbf") else v) for k, v in claims.items()}
        hs.verify(hs_token(c))


def test_leeway(monkeypatch):
    monkeypatch.setenv("SP_JWT_SECRET", "x" * 32)
    v = load_verifier(JwtSettings(algorithms=("HS256",), secret_env="SP_JWT_SECRET", leeway=30))
    assert v.verify(hs_token({"sub": "a", "exp": int(time.time()) - 10})) == "a"


def test_wrong_secret_and_alg_none_are_refused(hs):
    with pytest.raises(InvalidToken, match="signature"):
        hs.verify(hs_token({"sub": "a", "exp": int(time.time()) + 60}, secret="y" * 32))
    none_token = jwt.encode({"sub": "a", "exp": int(time.time()) + 60}, None, algorithm="none")
    with pytest.raises(InvalidToken, match="algorithm not allowed"):
        hs.verify(none_token)
    with pytest.raises(InvalidToken, match="malformed"):
        hs.verify("not.a.token")


def test_issuer_and_audience(monkeypatch):
    monkeypatch.setenv("SP_JWT_SECRET", "x" * 32)
    v = load_verifier(
        JwtSettings(
            algorithms=("HS256",), secret_env="SP_JWT_SECRET", issuer="https://idp", audience="shop"
        )
    )
    exp = int(time.time()) + 60
    assert v.verify(hs_token({"sub": "a", "exp": exp, "iss": "https://idp", "aud": "shop"})) == "a"
    with pytest.raises(InvalidToken, match="issuer"):
        v.verify(hs_token({"sub": "a", "exp": exp, "iss": "https://evil", "aud": "shop"}))
    with pytest.raises(InvalidToken, match="audience"):
        v.verify(hs_token({"sub": "a", "exp": exp, "iss": "https://idp", "aud": "other"}))


def test_rs256_pem_and_the_hs_confusion_attack(tmp_path, keys):
    (priv, _, pub_pem), _ = keys
    pem = tmp_path / "pub.pem"
    pem.write_bytes(pub_pem)
    v = load_verifier(JwtSettings(algorithms=("RS256",), public_key_file=str(pem)))
    exp = int(time.time()) + 60
    assert v.verify(jwt.encode({"sub": "bob", "exp": exp}, priv, algorithm="RS256")) == "bob"
    # an attacker "signs" an HS256 token with the public key as the HMAC secret
    forged = forge_hs256({"sub": "admin", "exp": exp}, pub_pem)
    with pytest.raises(InvalidToken, match="algorithm not allowed"):
        v.verify(forged)


def test_jwks_kid_selects_the_key(tmp_path, keys):
    (priv1, _, _), (priv2, _, _) = keys
    jwks = {
        "keys": [
            {
                **json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(priv1.public_key())),
                "kid": "k1",
                "alg": "RS256",
                "use": "sig",
            },
            {
                **json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(priv2.public_key())),
                "kid": "k2",
                "alg": "RS256",
                "use": "sig",
            },
        ]
    }
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    v = load_verifier(JwtSettings(algorithms=("RS256",), jwks_file=str(path)))
    exp = int(time.time()) + 60
    t2 = jwt.encode({"sub": "carol", "exp": exp}, priv2, algorithm="RS256", headers={"kid": "k2"})
    assert v.verify(t2) == "carol"
    wrong = jwt.encode(
        {"sub": "carol", "exp": exp}, priv1, algorithm="RS256", headers={"kid": "k2"}
    )
    with pytest.raises(InvalidToken, match="signature"):
        v.verify(wrong)
    unknown = jwt.encode({"sub": "x", "exp": exp}, priv1, algorithm="RS256", headers={"kid": "k9"})
    with pytest.raises(InvalidToken, match="unknown signing key"):
        v.verify(unknown)
    no_kid = jwt.encode({"sub": "x", "exp": exp}, priv1, algorithm="RS256")
    with pytest.raises(InvalidToken, match="unknown signing key"):
        v.verify(no_kid)


def test_cached_token_still_expires(hs):
    exp = int(time.time()) + 60
    tok = hs_token({"sub": "a", "exp": exp})
    assert hs.verify(tok) == "a"
    assert tok in hs.cache
    with pytest.raises(InvalidToken, match="expired"):
        hs.verify(tok, now=exp + 1)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(algorithms=()), "at least one algorithm"),
        (dict(algorithms=("none",), secret_env="SP_JWT_SECRET"), "'none' is never accepted"),
        (dict(algorithms=("HS256", "RS256"), secret_env="SP_JWT_SECRET"), "do not mix"),
        (dict(algorithms=("HS999",), secret_env="SP_JWT_SECRET"), "unknown algorithm"),
        (dict(algorithms=("HS256",)), "exactly one of"),
        (dict(algorithms=("HS256",), secret_env="SP_JWT_UNSET_VARIABLE"), "unset or empty"),
        (dict(algorithms=("RS256",), secret_env="SP_JWT_SECRET"), "public-key algorithms need"),
        (dict(algorithms=("RS256",), public_key_file="/nonexistent.pem"), "cannot read"),
    ],
)
def test_bad_settings(monkeypatch, settings, message):
    monkeypatch.setenv("SP_JWT_SECRET", "x" * 32)
    with pytest.raises(ValueError, match=message):
        load_verifier(JwtSettings(**settings))


def test_private_key_file_is_refused(tmp_path, keys):
    (_, priv_pem, _), _ = keys
    p = tmp_path / "priv.pem"
    p.write_bytes(priv_pem)
    with pytest.raises(ValueError):
        load_verifier(JwtSettings(algorithms=("RS256",), public_key_file=str(p)))


def test_config_jwt_source_and_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("SP_JWT_SECRET", "x" * 32)
    cfg = loads(
        textwrap.dedent("""
        [routing]
        keys = [{ from = "jwt", claim = "sub", algorithms = ["HS256"], secret_env = "SP_JWT_SECRET" },
                { from = "header", name = "X-User-Id" }]
    """)
        + BACKEND
    )
    src = cfg.routing.keys[0]
    assert src.kind == "jwt" and src.name == "Authorization"
    with pytest.raises(ConfigError) as e:
        loads(
            '[routing]\nkeys = [{ from = "jwt", algorithms = ["none"], secret = "inline" }]\n'
            + BACKEND
        )
    errs = "\n".join(e.value.errors)
    assert "routing.keys[0].secret: unknown key" in errs
    with pytest.raises(ConfigError) as e:
        loads(
            '[routing]\nkeys = [{ from = "jwt", algorithms = ["RS256"], public_key_file = "missing.pem" }]\n'
            + BACKEND,
            str(tmp_path / "x.toml"),
        )
    assert "routing.keys[0].public_key_file: cannot read" in e.value.errors[0]


def test_extractor_with_jwt_source(hs):
    src = KeySource("jwt", name="Authorization", jwt=hs)
    ex = KeyExtractor([src, KeySource("header", "X-User-Id")])
    tok = hs_token({"sub": "alice", "exp": int(time.time()) + 60})
    got = ex.extract(
        [(b"authorization", b"Bearer " + tok.encode()), (b"x-user-id", b"mallory")], b"/"
    )
    assert got.key == "alice" and got.source.kind == "jwt"
    # no token: the next source answers
    assert ex.extract([(b"x-user-id", b"bob")], b"/").key == "bob"
    # an invalid token is a 401, not a fall-through to the forgeable header
    with pytest.raises(KeyRejected) as e:
        ex.extract([(b"authorization", b"Bearer bad.token.here"), (b"x-user-id", b"mallory")], b"/")
    assert e.value.status == 401


def test_on_invalid_anonymous_falls_through(monkeypatch):
    monkeypatch.setenv("SP_JWT_SECRET", "x" * 32)
    v = load_verifier(
        JwtSettings(algorithms=("HS256",), secret_env="SP_JWT_SECRET", on_invalid="anonymous")
    )
    ex = KeyExtractor([KeySource("jwt", name="Authorization", jwt=v), KeySource("cookie", "uid")])
    got = ex.extract([(b"authorization", b"Bearer bad"), (b"cookie", b"uid=guest-1")], b"/")
    assert got.key == "guest-1"


@pytest.mark.parametrize(
    "value, token",
    [
        (b"Bearer abc", "abc"),
        (b"bearer   abc ", "abc"),
        (b"Basic abc", None),
        (b"Bearer", None),
        (b"Bearer \xff", None),
    ],
)
def test_bearer_token(value, token):
    assert bearer_token(value) == token


async def test_jwks_file_is_reread_on_reload(tmp_path, keys):
    """A reload (SIGHUP or POST /reload) reads the JWKS file again: rotated keys apply."""
    from stickyproxy.config import load
    from stickyproxy.control.server import Service

    (priv1, _, _), (priv2, _, _) = keys

    def write_jwks(priv, kid):
        jwk = {
            **json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(priv.public_key())),
            "kid": kid,
            "alg": "RS256",
        }
        (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))

    write_jwks(priv1, "k1")
    path = tmp_path / "proxy.toml"
    path.write_text(
        textwrap.dedent("""
        [admin]
        enabled = false
        [health]
        enabled = false
        [routing]
        keys = [{ from = "jwt", algorithms = ["RS256"], jwks_file = "jwks.json" }]
    """)
        + BACKEND
    )
    svc = Service(load(path), str(path), admin=False)
    exp = int(time.time()) + 60
    t1 = jwt.encode({"sub": "u1", "exp": exp}, priv1, algorithm="RS256", headers={"kid": "k1"})
    t2 = jwt.encode({"sub": "u2", "exp": exp}, priv2, algorithm="RS256", headers={"kid": "k2"})

    def key_of(token):
        return svc.proxy.router.extractor.extract(
            [(b"authorization", b"Bearer " + token.encode())], b"/"
        ).key

    assert key_of(t1) == "u1"
    with pytest.raises(KeyRejected):
        key_of(t2)
    write_jwks(priv2, "k2")
    ok, errors = await svc.reload("test")
    assert ok, errors
    assert key_of(t2) == "u2"
    with pytest.raises(KeyRejected):
        key_of(t1)
    await svc.health.stop()
