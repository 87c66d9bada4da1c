"""RFC 7662 token introspection that covers refresh tokens, and discovery that names it.

DOT's own IntrospectTokenView looks up access tokens only, and answers only a bearer token with
the `introspection` scope or a confidential client's credentials. This IdP's policy on top:

- A registered public client authenticates by its `client_id` in the form body alone, as it
  does at the token endpoint (RFC 7662 section 2.1 leaves the method to the server). A request
  with an Authorization header goes through DOT's own checks instead. Answers are not limited
  to the caller's own tokens.
- `token` may be an access or a refresh token; `token_type_hint` only decides which is looked
  up first.
- A refresh token is `active` when it exists, is not revoked, still has its access token and
  is inside REFRESH_TOKEN_EXPIRE_SECONDS: what DOT's validator requires of an unrevoked token.
  Rotation sets `revoked` on the old token, so a rotated token is inactive at once, also inside
  REFRESH_TOKEN_GRACE_PERIOD_SECONDS, where DOT would still accept a replay of it: `active`
  says whether the token was rotated, and only a replay says whether grace still covers it.
- With POST /test/settings {"introspection": false} every request is refused with 401
  `invalid_client`, as a provider that does not let this client introspect answers.

Every request is counted in /test/stats under "introspection" by its answer.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from django.db.models import F
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.utils.decorators import method_decorator
from django.views.decorators.csrf import csrf_exempt
from oauth2_provider.models import (  # type: ignore[import-untyped]
    get_access_token_model,
    get_application_model,
    get_refresh_token_model,
    refresh_token_expire_timedelta,
)
from oauth2_provider.views import (  # type: ignore[import-untyped]
    ConnectDiscoveryInfoView,
    IntrospectTokenView,
)

from tests.idp.django_project.runtime import RUNTIME, STATS


def _checksum(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _invalid_client(description: str) -> JsonResponse:
    body = {"error": "invalid_client", "error_description": description}
    return JsonResponse(body, status=401)


def _is_public_client(client_id: str) -> bool:
    application = get_application_model()
    clients = application.objects.filter(client_id=client_id, client_type=application.CLIENT_PUBLIC)
    return bool(client_id) and bool(clients.exists())


def _refresh_answer(token: str) -> dict[str, Any] | None:
    """The answer for a refresh token, or None when no refresh token has this value."""
    # Several rows may share a checksum; like DOT's validator, prefer the unrevoked one.
    row = (
        get_refresh_token_model()
        .objects.filter(token_checksum=_checksum(token))
        .select_related("access_token", "application", "user")
        .order_by(F("revoked").desc(nulls_first=True))
        .first()
    )
    if row is None:
        return None
    if row.revoked is not None or row.access_token is None:
        return {"active": False}
    lifetime = refresh_token_expire_timedelta()
    expires = None if lifetime is None else row.access_token.expires + lifetime
    if expires is not None and expires <= timezone.now():
        return {"active": False}
    answer: dict[str, Any] = {
        "active": True,
        "scope": row.access_token.scope,
        "client_id": row.application.client_id,
    }
    if row.user is not None:
        answer["username"] = row.user.get_username()
    if expires is not None:
        answer["exp"] = int(expires.timestamp())
    return answer


def _access_answer(token: str) -> dict[str, Any] | None:
    """DOT's answer for an access token, or None when no access token has this value."""
    if not get_access_token_model().objects.filter(token_checksum=_checksum(token)).exists():
        return None
    response = IntrospectTokenView.get_token_response(token)
    return dict(json.loads(response.content))


def _outcome(response: HttpResponse) -> str:
    if response.status_code == 401:
        return "refused"
    if response.status_code != 200:
        return f"http_{response.status_code}"
    return "active" if json.loads(response.content).get("active") is True else "inactive"


@method_decorator(csrf_exempt, name="dispatch")
class IntrospectionView(IntrospectTokenView):  # type: ignore[misc]
    """/o/introspect/: RFC 7662 for access and refresh tokens (module docstring)."""

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        response = self._dispatch(request, *args, **kwargs)
        STATS.introspection(_outcome(response))
        return response

    def _dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if request.method != "POST":
            return JsonResponse({"error": "invalid_request"}, status=405)
        if not RUNTIME.introspection:
            return _invalid_client("this client is not allowed to introspect tokens")
        if "HTTP_AUTHORIZATION" in request.META:
            response: HttpResponse = super().dispatch(request, *args, **kwargs)
            return response
        if not _is_public_client(request.POST.get("client_id", "")):
            return _invalid_client("send the client_id of a registered public client")
        return self.post(request, *args, **kwargs)

    def post(self, request: HttpRequest, *_args: Any, **_kwargs: Any) -> HttpResponse:
        token = request.POST.get("token", "")
        if not token:
            body = {"error": "invalid_request", "error_description": "token is missing"}
            return JsonResponse(body, status=400)
        lookups = [_access_answer, _refresh_answer]
        if request.POST.get("token_type_hint") == "refresh_token":
            lookups.reverse()
        for lookup in lookups:
            answer = lookup(token)
            if answer is not None:
                return JsonResponse(answer)
        return JsonResponse({"active": False})


class DiscoveryView(ConnectDiscoveryInfoView):  # type: ignore[misc]
    """DOT's OpenID discovery document, naming the introspection endpoint as RFC 8414's does."""

    def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        original: HttpResponse = super().get(request, *args, **kwargs)
        document = json.loads(original.content)
        document["introspection_endpoint"] = self._get_endpoint_url(
            request, "introspect", required=True
        )
        response = JsonResponse(document)
        response["Access-Control-Allow-Origin"] = "*"
        return response
