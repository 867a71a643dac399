"""Verified JWT claims as user keys (PyJWT).

Rules (RFC 8725, JWT best current practices):
- The algorithms are pinned by configuration, never taken from the token: ``none`` is
  refused at load, and one source may not mix HMAC with public-key algorithms (an HS256
  token "signed" with an RSA public key is the classic confusion attack).
- HMAC secrets come from an environment variable, never from the config file; public keys
  from a PEM file or a JWKS file whose ``kid`` selects the key.
- ``exp`` is required by default; ``exp``/``nbf``/``iss``/``aud`` are checked with a
  configurable leeway.

Verification is pure given the loaded keys. A verified token's claim is cached (bounded)
so a user's repeated requests cost one dictionary look-up plus the time checks; the cache
belongs to one set of keys and is discarded with them on reload.
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from jwt.algorithms import get_default_algorithms

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
# Verified tokens remembered per source (a token is a few hundred bytes).
CACHE_ENTRIES = 10_000
# Longest token accepted; longer ones are refused before any parsing.
MAX_TOKEN_BYTES = 8192


class InvalidToken(ValueError):
    """A token that must not be trusted; the message is safe to show a client."""


@dataclass(frozen=True)
class JwtSettings:
    header: str = "Authorization"
    claim: str = "sub"
    algorithms: tuple[str, ...] = ()
    secret_env: str = ""
    public_key_file: str = ""
    jwks_file: str = ""
    issuer: str = ""
    audience: str = ""
    leeway: float = 0.0
    require_exp: bool = True
    on_invalid: str = "reject"  # or "anonymous": fall through to the next key source


@dataclass
class JwtVerifier:
    settings: JwtSettings
    keys: dict[str | None, Any]  # kid → key (None: the only key)
    cache: OrderedDict = field(default_factory=OrderedDict)

    def verify(self, token: str, now: float | None = None) -> str:
        """The configured claim of a valid token, or InvalidToken."""
        now = time.time() if now is None else now
        hit = self.cache.get(token)
        if hit is not None:
            value, exp, nbf = hit
            lw = self.settings.leeway
            if exp is not None and now > exp + lw:
                del self.cache[token]
                raise InvalidToken("token has expired")
            if nbf is not None and now < nbf - lw:
                raise InvalidToken("token is not yet valid")
            return value
        if len(token) > MAX_TOKEN_BYTES:
            raise InvalidToken("token too long")
        s = self.settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("malformed token") from None
        alg = header.get("alg")
        if alg not in s.algorithms:
            raise InvalidToken("token algorithm not allowed")
        kid = header.get("kid")
        if kid is not None and kid in self.keys:
            key = self.keys[kid]
        elif None in self.keys:  # a single configured key (secret or PEM)
            key = self.keys[None]
        elif kid is None and len(self.keys) == 1:
            key = next(iter(self.keys.values()))
        else:
            raise InvalidToken("unknown signing key")
        options: jwt.types.Options = {"require": ["exp"] if s.require_exp else []}
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(s.algorithms),
                audience=s.audience or None,
                issuer=s.issuer or None,
                leeway=s.leeway,
                options=options,
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("token has expired") from None
        except jwt.ImmatureSignatureError:
            raise InvalidToken("token is not yet valid") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("token audience not accepted") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("token issuer not accepted") from None
        except jwt.MissingRequiredClaimError as e:
            raise InvalidToken(f"token lacks the {e.claim} claim") from None
        except jwt.PyJWTError:
            raise InvalidToken("token signature or format invalid") from None
        value = claims.get(s.claim)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value:
            raise InvalidToken(f"token has no usable {s.claim} claim")
        exp, nbf = claims.get("exp"), claims.get("nbf")
        self.cache[token] = (
            value,
            exp if isinstance(exp, (int, float)) else None,
            nbf if isinstance(nbf, (int, float)) else None,
        )
        if len(self.cache) > CACHE_ENTRIES:
            self.cache.popitem(last=False)
        return value


def _read_disk(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def bearer_token(value: bytes) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value (RFC 6750 §2.1), else None."""
    scheme, _, rest = value.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    tok = rest.strip()
    try:
        return tok.decode("ascii") if tok else None
    except UnicodeDecodeError:
        return None


def settings_problem(s: JwtSettings) -> str | None:
    """What is wrong with a source's settings alone (no file or environment read), as
    ``key: problem``; None when nothing is."""
    try:
        _check_settings(s)
    except ValueError as e:
        return str(e)
    return None


def _check_settings(s: JwtSettings) -> bool:
    """Whether the source is HMAC; ValueError when its settings cannot work."""
    if not s.algorithms:
        raise ValueError("algorithms: at least one algorithm must be pinned")
    known = set(get_default_algorithms()) - {"none"}
    for a in s.algorithms:
        if a.lower() == "none":
            raise ValueError("algorithms: 'none' is never accepted")
        if a not in known:
            raise ValueError(f"algorithms: unknown algorithm {a!r}")
    hmac = [a for a in s.algorithms if a in HMAC_ALGORITHMS]
    if hmac and len(hmac) != len(s.algorithms):
        raise ValueError(
            "algorithms: do not mix HMAC (HS*) and public-key algorithms in one source"
        )
    sources = [x for x in (s.secret_env, s.public_key_file, s.jwks_file) if x]
    if len(sources) != 1:
        raise ValueError("give exactly one of secret_env, public_key_file, jwks_file")
    if hmac and not s.secret_env:
        raise ValueError("secret_env: HMAC algorithms need a secret from the environment")
    if not hmac and s.secret_env:
        raise ValueError("secret_env: public-key algorithms need public_key_file or jwks_file")
    return bool(hmac)


def load_verifier(
    s: JwtSettings,
    read_file: Callable[[str], bytes] | None = None,
    environ: Mapping[str, str] | None = None,
) -> JwtVerifier:
    """Read the keys a source names (``environ``, default the process environment; a PEM
    or JWKS file read with ``read_file``, default from disk); ValueError on problems."""
    read = read_file or _read_disk
    env = os.environ if environ is None else environ
    if _check_settings(s):
        secret = env.get(s.secret_env, "")
        if not secret:
            raise ValueError(f"secret_env: environment variable {s.secret_env!r} is unset or empty")
        return JwtVerifier(s, {None: secret.encode()})
    if s.public_key_file:
        try:
            pem = read(s.public_key_file)
        except OSError as e:
            raise ValueError(f"public_key_file: cannot read: {e.strerror}") from None
        alg = get_default_algorithms()[s.algorithms[0]]
        try:
            key = alg.prepare_key(pem)
        except Exception as e:  # PyJWT raises several kinds for unusable key material
            raise ValueError(f"public_key_file: not a usable public key: {e}") from None
        if hasattr(key, "private_bytes"):
            raise ValueError("public_key_file: holds a private key; give the public key")
        return JwtVerifier(s, {None: key})
    try:
        data = json.loads(read(s.jwks_file).decode("utf-8"))
        jwks = jwt.PyJWKSet.from_dict(data)
    except OSError as e:
        raise ValueError(f"jwks_file: cannot read: {e.strerror}") from None
    except (ValueError, jwt.PyJWTError) as e:
        raise ValueError(f"jwks_file: not a usable JWKS: {e}") from None
    keys: dict[str | None, Any] = {}
    for k in jwks.keys:
        if k.algorithm_name and k.algorithm_name not in s.algorithms:
            continue
        keys[k.key_id] = k.key
    if not keys:
        raise ValueError("jwks_file: no key usable with the pinned algorithms")
    return JwtVerifier(s, keys)
