"""ID token validation: signature by the provider's keys, then every OIDC claim check.

Tokens are signed here with our own joserfc keys; `now` is fixed, so every time-based check is
exact. Each failure must be an IdTokenInvalid whose message names the check that failed.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, OctKey, RSAKey

from broker.errors import IdTokenInvalid
from broker.idp.idtoken import LEEWAY_SECONDS, unverified_kid, validate_id_token
from broker.model import Secret

ISSUER = "https://idp.example.nl/o"
CLIENT_ID = "broker-test"
NONCE = "n-0S6_WzA2Mj"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
T = int(NOW.timestamp())

RSA = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})
RSA_IMPOSTOR = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})  # same kid, other key
EC = ECKey.generate_key("P-256", parameters={"kid": "ec-1"})
PUBLIC_KEYS = KeySet.import_key_set(
    {"keys": [RSA.as_dict(private=False), EC.as_dict(private=False)]}
)


def claims(**changes: object) -> dict[str, Any]:
    """A valid claim set for CLIENT_ID at NOW; a change of None removes the claim."""
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": CLIENT_ID,
        "sub": "alice-sub",
        "exp": T + 300,
        "iat": T - 5,
        "nonce": NONCE,
    }
    base.update(changes)
    return {key: value for key, value in base.items() if value is not None}


def sign(payload: dict[str, Any], key: RSAKey | ECKey | OctKey = RSA, alg: str = "RS256") -> Secret:
    """A compact JWS of `payload` signed with `key`, whose kid goes in the header."""
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if key.kid is not None:
        header["kid"] = key.kid
    return Secret(jwt.encode(header, payload, key, algorithms=[alg]))


def unsigned(payload: dict[str, Any]) -> Secret:
    """An `alg: none` token, the classic downgrade."""

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return Secret(f"{part({'alg': 'none', 'kid': 'rsa-1'})}.{part(payload)}.")


def at_hash(access_token: str) -> str:
    """OIDC Core 3.1.3.6: base64url of the left half of SHA-256 of the access token."""
    digest = hashlib.sha256(access_token.encode()).digest()
    return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()


def check(
    token: Secret,
    *,
    nonce: str | None = NONCE,
    algorithms: tuple[str, ...] = ("RS256", "ES256"),
    access_token: str | None = None,
    keys: KeySet = PUBLIC_KEYS,
) -> dict[str, Any]:
    """validate_id_token with this module's issuer, client and clock."""
    return validate_id_token(
        token,
        keys,
        issuer=ISSUER,
        client_id=CLIENT_ID,
        nonce=nonce,
        algorithms=algorithms,
        now=NOW,
        access_token=None if access_token is None else Secret(access_token),
    )


def refused(token: Secret, **kw: Any) -> str:
    """The message of the IdTokenInvalid that `check` raises; it never shows the token."""
    with pytest.raises(IdTokenInvalid) as info:
        check(token, **kw)
    message = str(info.value)
    assert message.startswith("ID token check failed: ")
    assert token.reveal() not in message
    assert info.value.outcome == "invalid_grant"
    return message


# --- accepted ------------------------------------------------------------------------------------


def test_valid_rs256_token_returns_its_claims() -> None:
    """A token signed by the provider's RSA key with every claim right yields its claims."""
    assert check(sign(claims())) == claims()


def test_valid_es256_token_returns_its_claims() -> None:
    """An ES256 token verifies against the provider's EC key."""
    assert check(sign(claims(), EC, "ES256"))["sub"] == "alice-sub"


def test_expiry_and_issue_time_within_the_leeway_are_accepted() -> None:
    """Clock skew up to LEEWAY_SECONDS either way is tolerated."""
    skew = LEEWAY_SECONDS - 1
    assert check(sign(claims(exp=T - skew, iat=T + skew)))["sub"] == "alice-sub"


def test_audience_list_with_our_client_and_azp_is_accepted() -> None:
    """Several audiences are fine when azp names this client."""
    token = sign(claims(aud=[CLIENT_ID, "another-api"], azp=CLIENT_ID))
    assert check(token)["azp"] == CLIENT_ID


def test_no_nonce_expected_accepts_a_token_without_one() -> None:
    """When no nonce was sent (a refresh), a token without a nonce passes."""
    assert "nonce" not in check(sign(claims(nonce=None)), nonce=None)


def test_matching_at_hash_is_accepted() -> None:
    """at_hash that matches the access token passes."""
    token = sign(claims(at_hash=at_hash("at-123")))
    assert check(token, access_token="at-123")["at_hash"] == at_hash("at-123")


def test_at_hash_is_not_checked_without_an_access_token() -> None:
    """at_hash cannot be checked when no access token came with the ID token (netID's SSO)."""
    assert check(sign(claims(at_hash="not-the-hash")), access_token=None)["sub"] == "alice-sub"


def test_unverified_kid_reads_the_header() -> None:
    """The kid comes from the header without verifying anything, to pick or refetch keys."""
    assert unverified_kid(sign(claims())) == "rsa-1"
    assert unverified_kid(sign(claims(), OctKey.generate_key(256), "HS256")) is None


# --- refused -------------------------------------------------------------------------------------


def test_signature_by_another_key_with_the_same_kid_is_refused() -> None:
    """A token signed by a key the provider does not hold fails the signature check."""
    assert "signature" in refused(sign(claims(), RSA_IMPOSTOR))


def test_tampered_payload_is_refused() -> None:
    """Changing the payload of a signed token breaks its signature."""
    header, _, signature = sign(claims()).reveal().split(".")
    evil = base64.urlsafe_b64encode(json.dumps(claims(sub="mallory")).encode()).rstrip(b"=")
    assert "signature" in refused(Secret(f"{header}.{evil.decode()}.{signature}"))


@pytest.mark.parametrize(
    ("changes", "check_name"),
    [
        ({"iss": "https://evil.example/o"}, "iss"),
        ({"iss": ISSUER + "/"}, "iss"),
        ({"aud": "another-client"}, "aud"),
        ({"aud": ["another-client", "third"]}, "aud"),
        ({"exp": T - LEEWAY_SECONDS - 1}, "exp"),
        ({"iat": T + LEEWAY_SECONDS + 1}, "iat"),
        ({"nbf": T + LEEWAY_SECONDS + 1}, "nbf"),
        ({"nonce": "another-nonce"}, "nonce"),
        ({"nonce": None}, "nonce"),
        ({"azp": "another-client"}, "azp"),
        ({"aud": [CLIENT_ID, "another-api"]}, "azp"),
        ({"sub": None}, "sub"),
        ({"exp": None}, "exp"),
        ({"iat": None}, "iat"),
        ({"iss": None}, "iss"),
        ({"exp": "tomorrow"}, "exp"),
    ],
    ids=[
        "wrong-iss",
        "iss-with-trailing-slash",
        "wrong-aud",
        "aud-list-without-us",
        "expired-beyond-leeway",
        "iat-in-the-future",
        "nbf-in-the-future",
        "nonce-mismatch",
        "nonce-missing-when-sent",
        "azp-not-us",
        "several-audiences-without-azp",
        "no-sub",
        "no-exp",
        "no-iat",
        "no-iss",
        "exp-not-a-number",
    ],
)
def test_each_failed_claim_check_is_named(changes: dict[str, object], check_name: str) -> None:
    """Every claim check that fails raises IdTokenInvalid naming that claim."""
    assert check_name in refused(sign(claims(**changes)))


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"iat": T + 3600}, "iat is in the future (or not a time): the provider's clock or ours"),
        ({"nbf": T + 3600}, "nbf is in the future (or not a time): the provider's clock or ours"),
        ({"exp": "tomorrow"}, "exp is not a time"),
        ({"aud": "another-client"}, "aud does not match"),
    ],
)
def test_a_time_claim_out_of_range_says_what_is_wrong(
    changes: dict[str, object], reason: str
) -> None:
    """A time claim beyond the leeway says which way it is off, not merely "does not match"."""
    assert reason in refused(sign(claims(**changes)))


def test_nonce_mismatch_does_not_reveal_either_nonce() -> None:
    """The message names the check, not the values compared."""
    message = refused(sign(claims(nonce="their-nonce")))
    assert "their-nonce" not in message
    assert NONCE not in message


def test_wrong_at_hash_is_refused() -> None:
    """An at_hash that does not match the access token that came with it is refused."""
    assert "at_hash" in refused(sign(claims(at_hash=at_hash("at-123"))), access_token="at-456")


def test_alg_none_is_refused() -> None:
    """An unsigned token is never accepted, whatever its claims."""
    assert "algorithm" in refused(unsigned(claims()))


def test_hs256_is_refused_even_with_the_kid_of_a_real_key() -> None:
    """An HMAC-signed token is refused: only the provider's asymmetric algorithms count."""
    secret = OctKey.import_key(b"s" * 32, parameters={"kid": "rsa-1"})
    assert "algorithm" in refused(sign(claims(), secret, "HS256"))


def test_es256_is_refused_when_the_provider_only_advertises_rs256() -> None:
    """The algorithm list from discovery is enforced, not just the key type."""
    assert "algorithm" in refused(sign(claims(), EC, "ES256"), algorithms=("RS256",))


@pytest.mark.parametrize("text", ["", "not-a-jwt", "a.b.c", "a.b", "....."])
def test_malformed_token_is_refused(text: str) -> None:
    """Anything that is not a compact JWS fails as malformed, in both entry points."""
    with pytest.raises(IdTokenInvalid, match=r"malformed|decode"):
        unverified_kid(Secret(text))
    with pytest.raises(IdTokenInvalid):
        check(Secret(text))


def test_token_for_a_key_missing_from_the_set_is_refused() -> None:
    """A kid the key set does not hold fails (the client refetches before getting here)."""
    only_ec = KeySet.import_key_set({"keys": [EC.as_dict(private=False)]})
    refused(sign(claims()), keys=only_ec)
