"""Identity spoofing through the proxy (docs/THREAT_MODEL.md T3, T4, T9).

The proxy's promise (DESIGN.md P5, §4): a backend can trust X-Sticky-Key/-Backend/-Route/
-Ring because only the proxy sets them, and with a verified-JWT key source it can trust that
X-Sticky-Key is the token's claim. Every test here checks the bytes a raw backend received.
Builds on tests/dataplane/test_routing.py (test_client_sent_sticky_headers_are_removed,
test_strip_headers_are_never_forwarded, test_jwt_claim_is_the_routing_key) and
tests/dataplane/test_messages.py (test_request_trailers_cannot_smuggle_proxy_or_stripped_headers).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .judges import Rig, expect_rejected, parse_forwarded, strict_responder

SECRET_ENV = "SP_SECURITY_TEST_JWT_SECRET"
SECRET = "security-suite-secret-0123456789abcdef0123456789"
PROXY_FIELDS = ("X-Sticky-Key", "X-Sticky-Backend", "X-Sticky-Route", "X-Sticky-Ring")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict, claims: dict, key: bytes | None) -> str:
    """A compact JWT signed by hand (HMAC-SHA256 over ``key``, or unsigned when None): how
    an attacker builds what PyJWT refuses to encode (alg none, HS256 keyed by a PEM)."""
    signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    sig = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(sig)


def claims(sub="alice", **extra) -> dict:
    out = {"sub": sub, "exp": int(time.time()) + 600}
    out.update(extra)
    return out


async def _rig(raw_backend, proxy, overrides) -> Rig:
    be = await raw_backend("a", strict_responder())
    p = await proxy([be], overrides)
    rig = Rig(p, be)
    rig.mark()
    return rig


async def _forwarded_once(rig: Rig, raw: bytes):
    c = await rig.p.client()
    c.send(raw)
    r = await c.response()
    c.close()
    assert r.status == 200, (r.status, r.body)
    await asyncio.sleep(0.05)
    reqs, partial = parse_forwarded(rig.all_new())
    assert len(reqs) == 1 and not partial
    rig.mark()
    return reqs[0]


# ---------------------------------------------------------------------------------------
# the proxy's own fields

SPOOFS = [
    pytest.param(
        b"X-Sticky-Key: mallory\r\nX-Sticky-Backend: evil\r\nX-Sticky-Route: primary\r\n"
        b"X-Sticky-Ring: 000000000000\r\n",
        id="exact-case",
    ),
    pytest.param(
        b"x-sticky-key: mallory\r\nX-STICKY-BACKEND: evil\r\nx-StIcKy-RoUtE: failover\r\n"
        b"X-sticky-ring: 0\r\n",
        id="any-case",
    ),
    pytest.param(
        b"X-Sticky-Key: mallory\r\nx-sticky-key: mallory2\r\nX-STICKY-KEY: u\r\n"
        b"X-Sticky-Backend: evil\r\nX-Sticky-Backend: a\r\n",
        id="duplicated",
    ),
    pytest.param(b"X-Sticky-Key:   mallory  \r\nX-Sticky-Ring:\t0\r\n", id="padded-values"),
    pytest.param(b"X-Sticky-Key: \r\nX-Sticky-Backend:\r\n", id="empty-values"),
    pytest.param(
        b"X-Sticky-Keys: mallory\r\nX-Sticky-: x\r\nX-Sticky-Key-Override: mallory\r\n",
        id="prefix-relatives",
    ),
]


@pytest.mark.parametrize("spoof", SPOOFS)
async def test_client_copies_of_proxy_fields_never_reach_the_backend(raw_backend, proxy, spoof):
    rig = await _rig(raw_backend, proxy, {})
    req = await _forwarded_once(
        rig, b"GET / HTTP/1.1\r\nHost: h\r\nX-User-Id: u\r\n" + spoof + b"\r\n"
    )
    assert req.values("x-sticky-key") == [b"u"]
    assert req.values("x-sticky-backend") == [b"a"]
    assert req.values("x-sticky-route") == [b"primary"]
    assert req.values("x-sticky-ring") == [rig.p.fingerprint.encode()]
    # nothing else under the prefix: the whole X-Sticky- namespace is the proxy's
    assert all(
        not n.lower().startswith(b"x-sticky-")
        or n.lower().decode() in [f.lower() for f in PROXY_FIELDS]
        for n, _ in req.headers
    ), req.headers


@pytest.mark.parametrize("where", ["trailer", "trailer-any-case", "trailer-duplicated"])
async def test_proxy_fields_in_request_trailers_never_reach_the_backend(raw_backend, proxy, where):
    rig = await _rig(raw_backend, proxy, {"headers": {"strip": ["X-Remote-User"]}})
    trailers = {
        "trailer": b"X-Sticky-Key: mallory\r\nX-Sticky-Route: failover\r\nX-Remote-User: admin\r\n",
        "trailer-any-case": b"x-STICKY-key: mallory\r\nx-remote-user: admin\r\nX-Sticky-Ring: 0\r\n",
        "trailer-duplicated": b"X-Sticky-Key: m1\r\nX-Sticky-Key: m2\r\nX-Sticky-Backend: evil\r\n"
        b"X-Forwarded-For: 6.6.6.6\r\n",
    }[where]
    raw = (
        b"POST /up HTTP/1.1\r\nHost: h\r\nX-User-Id: u\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n" + trailers + b"X-Checksum: ok\r\n\r\n"
    )
    req = await _forwarded_once(rig, raw)
    assert req.body == b"hello"
    assert req.values("x-sticky-key") == [b"u"]
    names = {n.lower() for n, _ in req.trailers}
    assert not names & {
        b"x-sticky-key",
        b"x-sticky-backend",
        b"x-sticky-route",
        b"x-sticky-ring",
        b"x-remote-user",
        b"x-forwarded-for",
    }, req.trailers
    assert (b"X-Checksum", b"ok") in req.trailers


async def test_custom_prefix_namespace_is_the_proxys(raw_backend, proxy):
    rig = await _rig(raw_backend, proxy, {"headers": {"prefix": "X-Route-"}})
    req = await _forwarded_once(
        rig,
        b"GET / HTTP/1.1\r\nHost: h\r\nX-User-Id: u\r\n"
        b"x-route-key: mallory\r\nX-ROUTE-BACKEND: evil\r\n\r\n",
    )
    assert req.values("x-route-key") == [b"u"]
    assert req.values("x-route-backend") == [b"a"]


async def test_connection_options_cannot_remove_the_proxys_fields(raw_backend, proxy):
    """A client naming the proxy's fields in Connection cannot make the proxy drop its own
    copies (which would let a backend fall back to something else)."""
    rig = await _rig(raw_backend, proxy, {})
    req = await _forwarded_once(
        rig,
        b"GET / HTTP/1.1\r\nHost: h\r\nX-User-Id: u\r\n"
        b"Connection: X-Sticky-Key, X-Sticky-Backend, X-Sticky-Route, "
        b"X-Sticky-Ring, X-Forwarded-For, X-Forwarded-Host\r\n\r\n",
    )
    assert req.values("x-sticky-key") == [b"u"]
    assert req.values("x-sticky-backend") == [b"a"]
    assert req.values("x-sticky-route") == [b"primary"]
    assert len(req.values("x-sticky-ring")) == 1
    assert req.values("x-forwarded-for") == [b"127.0.0.1"]
    assert req.values("x-forwarded-host") == [b"h"]


# ---------------------------------------------------------------------------------------
# names that CGI-style backends read as the same field


@pytest.mark.parametrize(
    "alias",
    [
        b"X_Sticky_Key: mallory",
        b"X-Sticky_Key: mallory",
        b"x_sticky_backend: evil",
        b"X_User_Id: forged",
        b"X-User_Id: forged",
        b"X_Forwarded_For: 6.6.6.6",
        b"Transfer_Encoding: chunked",
        b"Content_Length: 5",
    ],
)
async def test_underscore_aliases_of_protected_fields_never_reach_the_backend(
    raw_backend, proxy, alias
):
    rig = await _rig(
        raw_backend,
        proxy,
        {
            "headers": {"strip": ["X-User-Id"]},
            "routing": {"keys": [{"from": "cookie", "name": "uid"}], "no_key": "reject"},
        },
    )
    c = await rig.p.client()
    c.send(b"GET / HTTP/1.1\r\nHost: h\r\nCookie: uid=alice\r\n" + alias + b"\r\n\r\n")
    r = await c.response()
    c.close()
    if 400 <= r.status < 500:  # refusing the request is fine too
        return
    await asyncio.sleep(0.05)
    reqs, _ = parse_forwarded(rig.all_new())
    names = {n.lower().replace(b"_", b"-") for req in reqs for n, _ in req.headers if b"_" in n}
    assert not names, f"forwarded aliases: {names}"


# ---------------------------------------------------------------------------------------
# a verified JWT claim as the key, X-User-Id stripped


@pytest.fixture(scope="module")
def rsa_keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("jwtkeys")
    priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub_pem = priv.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (d / "pub.pem").write_bytes(pub_pem)
    return priv, other, pub_pem, d / "pub.pem"


@pytest.fixture
async def rs_rig(raw_backend, proxy, rsa_keys):
    _, _, _, pub_path = rsa_keys
    return await _rig(
        raw_backend,
        proxy,
        {
            "routing": {
                "keys": [
                    {
                        "from": "jwt",
                        "header": "Authorization",
                        "claim": "sub",
                        "algorithms": ["RS256"],
                        "public_key_file": str(pub_path),
                        "issuer": "https://issuer.test",
                    }
                ],
                "no_key": "reject",
            },
            "headers": {"strip": ["X-User-Id"]},
        },
    )


@pytest.fixture
async def hs_rig(raw_backend, proxy, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, SECRET)
    return await _rig(
        raw_backend,
        proxy,
        {
            "routing": {
                "keys": [
                    {
                        "from": "jwt",
                        "header": "Authorization",
                        "claim": "sub",
                        "algorithms": ["HS256"],
                        "secret_env": SECRET_ENV,
                    }
                ],
                "no_key": "reject",
            },
            "headers": {"strip": ["X-User-Id"]},
        },
    )


def rs_token(rsa_keys, sub="alice", key=None, **extra) -> str:
    priv = key or rsa_keys[0]
    return jwt.encode(claims(sub, iss="https://issuer.test", **extra), priv, algorithm="RS256")


FORGED_USER = [
    pytest.param(b"X-User-Id: mallory\r\n", id="plain"),
    pytest.param(b"x-user-id: mallory\r\nX-USER-ID: mallory2\r\n", id="any-case-duplicated"),
    pytest.param(b"X-User-Id: alice\r\n", id="same-as-claim"),
    pytest.param(b"X-Sticky-Key: mallory\r\nX-User-Id: mallory\r\n", id="with-sticky-key"),
]


@pytest.mark.parametrize("forged", FORGED_USER)
async def test_forged_user_header_never_reaches_the_backend_and_the_key_is_the_claim(
    rs_rig, rsa_keys, forged
):
    tok = rs_token(rsa_keys, "alice").encode()
    req = await _forwarded_once(
        rs_rig,
        b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer " + tok + b"\r\n" + forged + b"\r\n",
    )
    assert req.values("x-user-id") == []
    assert req.values("x-sticky-key") == [b"alice"]


async def test_forged_user_header_in_trailers_never_reaches_the_backend(rs_rig, rsa_keys):
    tok = rs_token(rsa_keys, "alice").encode()
    req = await _forwarded_once(
        rs_rig,
        b"POST / HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer "
        + tok
        + b"\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n"
        b"X-User-Id: mallory\r\nx-user-id: m2\r\n\r\n",
    )
    assert req.body == b"hi"
    assert not any(n.lower() == b"x-user-id" for n, _ in req.headers + req.trailers)
    assert req.values("x-sticky-key") == [b"alice"]


def _swap_payload(token: str, new_claims: dict) -> str:
    """Another payload under a genuine signature (the signature no longer matches)."""
    head, _, sig = token.split(".")
    return head + "." + _b64(json.dumps(new_claims).encode()) + "." + sig


def _bad_rs_tokens(rsa_keys):
    priv, other, pub_pem, _ = rsa_keys
    now = int(time.time())
    good_claims = claims("mallory", iss="https://issuer.test")
    return {
        "alg-none": forge({"alg": "none", "typ": "JWT"}, good_claims, None),
        "alg-None-mixed-case": forge({"alg": "None", "typ": "JWT"}, good_claims, None),
        "hs256-keyed-with-the-public-pem": forge(
            {"alg": "HS256", "typ": "JWT"}, good_claims, pub_pem
        ),
        "hs256-keyed-with-pem-no-newline": forge(
            {"alg": "HS256", "typ": "JWT"}, good_claims, pub_pem.strip()
        ),
        "rs256-by-another-key": rs_token(rsa_keys, "mallory", key=other),
        "rs256-expired": jwt.encode(
            {"sub": "mallory", "exp": now - 3600, "iss": "https://issuer.test"},
            priv,
            algorithm="RS256",
        ),
        "rs256-without-exp": jwt.encode(
            {"sub": "mallory", "iss": "https://issuer.test"}, priv, algorithm="RS256"
        ),
        "rs256-not-yet-valid": rs_token(rsa_keys, "mallory", nbf=now + 3600),
        "rs256-wrong-issuer": jwt.encode(
            {"sub": "mallory", "exp": now + 600, "iss": "https://evil.test"},
            priv,
            algorithm="RS256",
        ),
        "rs256-sub-not-a-string": jwt.encode(
            {"sub": {"id": "mallory"}, "exp": now + 600, "iss": "https://issuer.test"},
            priv,
            algorithm="RS256",
        ),
        "rs256-signature-stripped": rs_token(rsa_keys, "mallory").rsplit(".", 1)[0] + ".",
        "rs256-payload-swapped": _swap_payload(
            rs_token(rsa_keys, "mallory"), claims("admin", iss="https://issuer.test")
        ),
        "garbage": "not.a.jwt",
        "too-long": rs_token(rsa_keys, "mallory", pad="x" * 9000),
    }


BAD_RS = [
    "alg-none",
    "alg-None-mixed-case",
    "hs256-keyed-with-the-public-pem",
    "hs256-keyed-with-pem-no-newline",
    "rs256-by-another-key",
    "rs256-expired",
    "rs256-without-exp",
    "rs256-not-yet-valid",
    "rs256-wrong-issuer",
    "rs256-sub-not-a-string",
    "rs256-signature-stripped",
    "rs256-payload-swapped",
    "garbage",
    "too-long",
]


@pytest.mark.parametrize("which", BAD_RS)
async def test_invalid_token_is_401_without_backend_contact(rs_rig, rsa_keys, which):
    tok = _bad_rs_tokens(rsa_keys)[which].encode()
    r = await expect_rejected(
        rs_rig,
        b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer "
        + tok
        + b"\r\nX-User-Id: mallory\r\n\r\n",
        statuses=frozenset({401}),
    )
    assert r.get(
        "WWW-Authenticate",
    ) is not None and r.get("WWW-Authenticate").startswith("Bearer")


@pytest.mark.parametrize(
    "which",
    [
        "alg-none",
        "rs256-signed-token-replayed-as-hs256",
        "hs-other-secret",
        "hs384-same-secret",
        "two-authorization-fields",
    ],
)
async def test_invalid_hs_token_is_401_without_backend_contact(hs_rig, rsa_keys, which):
    good = claims("mallory")
    tok = {
        "alg-none": forge({"alg": "none"}, good, None),
        "rs256-signed-token-replayed-as-hs256": jwt.encode(good, rsa_keys[0], algorithm="RS256"),
        "hs-other-secret": jwt.encode(
            good, "another-secret-0123456789abcdef0123456789", algorithm="HS256"
        ),
        "hs384-same-secret": jwt.encode(good, SECRET, algorithm="HS384"),
        "two-authorization-fields": jwt.encode(claims("alice"), SECRET, algorithm="HS256"),
    }[which].encode()
    extra = (
        (
            b"Authorization: Bearer "
            + jwt.encode(claims("mallory"), SECRET, algorithm="HS256").encode()
            + b"\r\n"
        )
        if which == "two-authorization-fields"
        else b""
    )
    await expect_rejected(
        hs_rig,
        b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer " + tok + b"\r\n" + extra + b"\r\n",
        statuses=frozenset({401}),
    )


async def test_valid_hs_token_routes_on_its_claim(hs_rig):
    tok = jwt.encode(claims("alice"), SECRET, algorithm="HS256").encode()
    req = await _forwarded_once(
        hs_rig,
        b"GET / HTTP/1.1\r\nHost: h\r\nauthorization: bearer "
        + tok
        + b"\r\nX-User-Id: mallory\r\n\r\n",
    )
    assert req.values("x-sticky-key") == [b"alice"] and req.values("x-user-id") == []


async def test_missing_token_with_no_key_reject_is_refused(rs_rig):
    await expect_rejected(
        rs_rig, b"GET / HTTP/1.1\r\nHost: h\r\nX-User-Id: alice\r\n\r\n", statuses=frozenset({400})
    )


async def test_signed_claim_with_control_characters_cannot_inject_a_field(hs_rig):
    """A validly signed token whose claim holds CR LF: the proxy refuses the key rather than
    write "X-Sticky-Key: a\\r\\nX-Evil: 1" to a backend."""
    tok = jwt.encode(claims("a\r\nX-Admin: 1"), SECRET, algorithm="HS256").encode()
    await expect_rejected(
        hs_rig, b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer " + tok + b"\r\n\r\n"
    )


# ---------------------------------------------------------------------------------------
# keys from the query and the path are decoded: encoded CR LF cannot become a field


@pytest.mark.parametrize(
    "target",
    [
        b"/?user=a%0d%0aX-Admin:%201",
        b"/?user=a%0aX-Admin:1",
        b"/?user=%00",
        b"/?user=a%c2%85b",
        b"/users/a%0d%0aX-Admin:%201/x",
        b"/users/%0d%0a%0d%0aGET%20/admin%20HTTP/1.1",
    ],
)
async def test_decoded_key_with_control_characters_is_refused(raw_backend, proxy, target):
    rig = await _rig(
        raw_backend,
        proxy,
        {
            "routing": {
                "keys": [
                    {"from": "query", "name": "user"},
                    {"from": "path", "pattern": "^/users/(?P<key>[^/]+)"},
                ],
                "no_key": "reject",
            }
        },
    )
    await expect_rejected(rig, b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")


# ---------------------------------------------------------------------------------------
# documented residual risk: an unverified source after a jwt source


async def test_unverified_fallback_after_an_anonymous_jwt_source_is_not_authenticated(
    raw_backend, proxy, monkeypatch
):
    """Residual risk T3-R2 (docs/THREAT_MODEL.md): with `on_invalid = "anonymous"` and a
    header source after it, a request with no (or a bad) token is keyed by whatever the
    client puts in that header, even when the same header is in [headers] strip (strip only
    stops forwarding). This test pins the behaviour down so the threat model stays true."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    rig = await _rig(
        raw_backend,
        proxy,
        {
            "routing": {
                "keys": [
                    {
                        "from": "jwt",
                        "header": "Authorization",
                        "claim": "sub",
                        "algorithms": ["HS256"],
                        "secret_env": SECRET_ENV,
                        "on_invalid": "anonymous",
                    },
                    {"from": "header", "name": "X-User-Id"},
                ],
                "no_key": "reject",
            },
            "headers": {"strip": ["X-User-Id"]},
        },
    )
    req = await _forwarded_once(
        rig, b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer bad\r\nX-User-Id: victim\r\n\r\n"
    )
    assert req.values("x-sticky-key") == [b"victim"]
    assert req.values("x-user-id") == []


async def test_request_behind_a_refused_token_is_not_forwarded(hs_rig):
    good = jwt.encode(claims("alice"), SECRET, algorithm="HS256").encode()
    await _forwarded_once(
        hs_rig, b"GET /warm HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer " + good + b"\r\n\r\n"
    )  # a pooled upstream connection
    await expect_rejected(
        hs_rig,
        b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer forged.token.x\r\n\r\n"
        b"DELETE /account HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer " + good + b"\r\n\r\n",
        statuses=frozenset({401}),
    )
