"""ID token validation: signature by the provider's JWKS, then the OIDC claim checks."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from authlib.oidc.core import CodeIDToken
from joserfc import jwt
from joserfc.errors import (
    BadSignatureError,
    ExpiredTokenError,
    InvalidClaimError,
    JoseError,
    MissingClaimError,
)
from joserfc.jwk import KeySet
from joserfc.jws import extract_compact

from broker.errors import IdTokenInvalid
from broker.model import Secret

LEEWAY_SECONDS = 60


# What an invalid time claim means (beyond the leeway); any other claim "does not match".
_INVALID = {
    "exp": "exp is not a time",
    "iat": "iat is in the future (or not a time): the provider's clock or ours is off",
    "nbf": "nbf is in the future (or not a time): the provider's clock or ours is off",
}


def unverified_kid(id_token: Secret) -> str | None:
    """The `kid` of the token's header, to pick or refetch keys; None when absent."""
    try:
        header = extract_compact(id_token.reveal().encode()).headers()
    except (JoseError, ValueError):
        raise IdTokenInvalid("ID token check failed: malformed (not a compact JWS)") from None
    kid = header.get("kid")
    return kid if isinstance(kid, str) else None


def validate_id_token(
    id_token: Secret,
    keys: KeySet,
    *,
    issuer: str | None,
    client_id: str,
    nonce: str | None,
    algorithms: Sequence[str],
    now: datetime,
    access_token: Secret | None = None,
) -> dict[str, Any]:
    """The ID token's claims once every check passes; IdTokenInvalid names the first failure."""
    try:
        token = jwt.decode(id_token.reveal(), keys, algorithms=list(algorithms))
    except BadSignatureError:
        raise IdTokenInvalid("ID token check failed: signature does not verify") from None
    except JoseError as exc:
        raise IdTokenInvalid(f"ID token check failed: {exc.error}") from None
    except ValueError:
        raise IdTokenInvalid("ID token check failed: malformed token") from None
    options: dict[str, Any] = {"aud": {"essential": True, "value": client_id}}
    if issuer is not None:
        options["iss"] = {"essential": True, "value": issuer}
    params: dict[str, Any] = {"client_id": client_id, "nonce": nonce}
    if access_token is not None:
        params["access_token"] = access_token.reveal()
    claims = CodeIDToken(token.claims, token.header, options=options, params=params)
    try:
        claims.validate(now=int(now.timestamp()), leeway=LEEWAY_SECONDS)
    except ExpiredTokenError:
        raise IdTokenInvalid("ID token check failed: exp (the token has expired)") from None
    except MissingClaimError as exc:
        raise IdTokenInvalid(f"ID token check failed: {exc.claim} is missing") from None
    except InvalidClaimError as exc:
        reason = _INVALID.get(exc.claim, f"{exc.claim} does not match")
        raise IdTokenInvalid(f"ID token check failed: {reason}") from None
    except JoseError as exc:
        raise IdTokenInvalid(f"ID token check failed: {exc.error}") from None
    if nonce is not None and claims.get("nonce") != nonce:
        raise IdTokenInvalid("ID token check failed: nonce does not match")
    return dict(claims)
