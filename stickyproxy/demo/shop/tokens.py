"""The shop's bearer tokens: HS256 JWTs issued by ``POST /login`` and verified on every request
that presents one, in both modes.

The shop verifies them itself (signature, ``exp``, the claims revocation needs, and that the
token's ``sub`` is the user the request is routed by), so it works behind the proxy whatever
its key source; behind the proxy's verifying JWT key source the check is simply done twice.
Revocation is decided afterwards, where the user's state lives (``revocation.py``).

``iat`` is a fractional NumericDate (RFC 7519 §2 allows non-integer values), so a token issued
in the same second as a logout-everywhere, but after it, is not covered by its cut-off.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Mapping
from typing import Any

import jwt

ALGORITHM = "HS256"
# Claims every shop token carries; a token without one is refused before revocation is asked.
REQUIRED_CLAIMS = ("sub", "jti", "iat", "exp")
# No leeway on exp (RFC 7519 §4.1.4 allows some): a revoked token's entry is kept until its exp
# and no longer, so a verifier admitting tokens past exp would admit revoked ones.
LEEWAY = 0.0


class TokenRejected(Exception):
    """A presented token the shop will not accept; the message says why (for the 401)."""


def issue(user: str, secret: str, lifetime: float, *, now: float | None = None) -> dict[str, Any]:
    """A new token for ``user``: ``{"token", "jti", "iat", "exp"}``."""
    issued = time.time() if now is None else now
    claims = {
        "sub": user,
        "jti": secrets.token_urlsafe(12),
        "iat": issued,
        "exp": int(issued + lifetime),
    }
    return {
        "token": jwt.encode(claims, secret, algorithm=ALGORITHM),
        **{k: claims[k] for k in ("jti", "iat", "exp")},
    }


def bearer(authorization: str) -> str:
    """The token of an ``Authorization: Bearer <token>`` value (RFC 6750 §2.1)."""
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise TokenRejected("Authorization must be 'Bearer <token>'")
    return token.strip()


def _numeric_date(claims: Mapping[str, Any], name: str) -> float:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TokenRejected(f"token's {name!r} is not a NumericDate (RFC 7519 §2)")
    return float(value)


def verify(authorization: str, user: str, secret: str, max_lifetime: float) -> Mapping[str, Any]:
    """The verified claims of the request's bearer token, which must belong to ``user`` and
    live at most ``max_lifetime`` (longer ones could not be revoked for their whole life)."""
    token = bearer(authorization)
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            leeway=LEEWAY,
            options={"require": list(REQUIRED_CLAIMS)},
        )
    except jwt.ExpiredSignatureError:
        raise TokenRejected("token expired") from None
    except jwt.InvalidSignatureError:
        raise TokenRejected("token signature does not verify") from None
    except jwt.MissingRequiredClaimError as exc:
        raise TokenRejected(f"token lacks the {exc.claim!r} claim") from None
    except jwt.DecodeError as exc:
        raise TokenRejected(f"malformed token: {exc}") from None
    except jwt.InvalidTokenError as exc:
        raise TokenRejected(f"invalid token: {exc}") from None
    if claims.get("sub") != user:
        raise TokenRejected("token belongs to another user")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti:
        raise TokenRejected("token's jti must be a non-empty string")
    if _numeric_date(claims, "exp") - _numeric_date(claims, "iat") > max_lifetime:
        raise TokenRejected(
            f"token lives longer than the shop's token lifetime ({max_lifetime:g}s)"
        )
    return claims
