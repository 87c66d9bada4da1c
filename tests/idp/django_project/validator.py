"""DOT's validator with counters for the rotation tests; its decisions are DOT's own.

`validate_refresh_token` in DOT 3.4.1 looks the presented token up by checksum. A revoked
(rotated or revoked) token is accepted again only while inside the grace period *and* still
superseded (the access token it minted is alive); otherwise, with reuse protection on, DOT
revokes the whole family (`RefreshToken.revoke_family`) and refuses. The wrapper repeats the
lookup to tell those cases apart and counts them; it changes no outcome.

`validate_device_code` is what oauthlib 4 asks of a validator when a device polls the token
endpoint, and DOT 3.4.1 predates it: it answers from DOT's own DeviceGrant row, the way DOT's
token view already decides before calling oauthlib.
"""

from __future__ import annotations

import hashlib
from typing import Any

from django.db.models import F
from oauth2_provider.models import (  # type: ignore[import-untyped]
    get_device_grant_model,
    get_refresh_token_model,
)
from oauth2_provider.oauth2_validators import OAuth2Validator  # type: ignore[import-untyped]
from oauth2_provider.settings import oauth2_settings  # type: ignore[import-untyped]
from oauthlib.oauth2.rfc8628.grant_types import (  # type: ignore[import-untyped]
    DeviceCodeGrant,
)

from tests.idp.django_project.runtime import STATS


class CountingValidator(OAuth2Validator):  # type: ignore[misc]
    """Counts spent refresh tokens, in-grace replays and reuse-protection revocations."""

    def validate_refresh_token(
        self, refresh_token: str, client: Any, request: Any, *args: Any, **kwargs: Any
    ) -> bool:
        checksum = hashlib.sha256(refresh_token.encode("utf-8")).hexdigest()
        row = (
            get_refresh_token_model()
            .objects.filter(token_checksum=checksum)
            .order_by(F("revoked").desc(nulls_first=True))
            .first()
        )
        valid = bool(
            super().validate_refresh_token(refresh_token, client, request, *args, **kwargs)
        )
        if row is not None and row.revoked is not None:
            STATS.add("spent_refresh_presented")
            if valid:
                STATS.add("in_grace_replays")
            elif oauth2_settings.REFRESH_TOKEN_REUSE_PROTECTION and row.token_family:
                STATS.add("reuse_family_revocations")
        return valid

    def validate_device_code(self, client_id: str, code: str, request: Any) -> str | None:
        model = get_device_grant_model()
        device = model.objects.filter(device_code=code, client_id=client_id).first()
        if device is None:
            return None
        if device.status == model.AUTHORIZED:
            request.user = device.user
            request.scopes = device.scope.split()
            return str(DeviceCodeGrant.DEVICE_CODE_AUTHORIZED)
        statuses = {
            model.AUTHORIZATION_PENDING: DeviceCodeGrant.DEVICE_CODE_PENDING,
            model.DENIED: DeviceCodeGrant.DEVICE_CODE_DENIED,
            model.EXPIRED: DeviceCodeGrant.DEVICE_CODE_EXPIRED,
        }
        status = statuses.get(device.status)
        return None if status is None else str(status)

    def get_additional_claims(self, request: Any) -> dict[str, Any]:
        # DOT maps preferred_username to the "profile" scope (oidc_claim_scope).
        return {"preferred_username": request.user.username}

    def _save_bearer_token(self, token: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        # DOT answers a replay it accepts (in grace, or two requests racing on one live token)
        # with the pair already minted instead of the fresh one oauthlib generated.
        minted = token.get("refresh_token")
        result = super()._save_bearer_token(token, request, *args, **kwargs)
        if request.grant_type == "refresh_token" and minted and token["refresh_token"] != minted:
            STATS.add("same_pair_returned")
        return result
