"""Test-only views: a counting, fault-injecting token endpoint, DOT's device authorization
endpoint with the runtime's interval and code lifetime, discovery that names it, and the /test/
controls.

The /test/ endpoints need no authentication: the server listens on 127.0.0.1 only and lives
for one test.
"""

from __future__ import annotations

import json
import time
from typing import Any

from django.contrib.auth import get_user_model
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST
from oauth2_provider.views import (  # type: ignore[import-untyped]
    DeviceAuthorizationView,
    OAuthServerMetadataView,
    TokenView,
)
from oauthlib.oauth2 import DeviceApplicationServer  # type: ignore[import-untyped]

from tests.idp.django_project.runtime import FAULTS, RUNTIME, STATS


class CountingTokenView(TokenView):  # type: ignore[misc]
    """DOT's token endpoint, counted, and failing or answering late when a fault is armed."""

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        grant_type = request.POST.get("grant_type", "") or "(none)"
        STATS.token_request(grant_type)
        fault = FAULTS.take_status()
        if fault is not None:
            STATS.add("injected_faults")
            status, body = fault
            return HttpResponse(body, status=status, content_type="text/plain")
        response: HttpResponse = super().post(request, *args, **kwargs)
        if grant_type == "refresh_token":
            if response.status_code == 200:
                STATS.add("refresh_ok")
            else:
                STATS.refresh_failure(_error_code(response))
        delay = FAULTS.take_delay()
        if delay:
            # DOT has committed the rotation; only the answer is late.
            time.sleep(delay)
        return response


class RuntimeDeviceServer(DeviceApplicationServer):  # type: ignore[misc]
    """oauthlib's device authorization server, with the interval and lifetime of RUNTIME.

    oauthlib takes no code lifetime from DOT's settings (always 1800 s); tests of expiry need
    codes that die within seconds.
    """

    def create_device_authorization_response(
        self, *args: Any, **kwargs: Any
    ) -> tuple[dict[str, str], Any, int]:
        headers, body, status = super().create_device_authorization_response(*args, **kwargs)
        # oauthlib 4 echoes the resolved scope, which DOT 3.4.1's DeviceCodeResponse does not
        # accept (a 500); RFC 8628 defines no scope in this answer.
        if status == 200 and isinstance(body, dict):
            body.pop("scope", None)
        return headers, body, status

    @property
    def interval(self) -> int:
        return RUNTIME.device_interval

    @property
    def expires_in(self) -> int:
        return RUNTIME.device_expires_in


class RuntimeDeviceAuthorizationView(DeviceAuthorizationView):  # type: ignore[misc]
    """DOT's device authorization endpoint (RFC 8628 section 3.1), answering from RUNTIME."""

    server_class = RuntimeDeviceServer


class DeviceMetadataView(OAuthServerMetadataView):  # type: ignore[misc]
    """DOT's RFC 8414 document, naming the device authorization endpoint it serves.

    DOT 3.4.1 serves the endpoint but lists it in neither discovery document; RFC 8628 section
    4 puts it in this one.
    """

    def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        response: HttpResponse = super().get(request, *args, **kwargs)
        data = json.loads(response.content)
        data["device_authorization_endpoint"] = f"{data['issuer']}/device-authorization/"
        return JsonResponse(data)


def _error_code(response: HttpResponse) -> str:
    try:
        return str(json.loads(response.content)["error"])
    except (ValueError, KeyError, TypeError):
        return f"http_{response.status_code}"


def _json_body(request: HttpRequest) -> dict[str, Any]:
    body = json.loads(request.body or b"{}")
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object")
    return body


@require_GET
def stats(request: HttpRequest) -> JsonResponse:
    """Counters since the process started."""
    return JsonResponse(STATS.snapshot())


@csrf_exempt
@require_POST
def faults(request: HttpRequest) -> JsonResponse:
    """Arm token-endpoint faults: {"token_status": 503, "count": N} or {"token_delay": s, ...}."""
    FAULTS.arm(_json_body(request))
    return JsonResponse({"armed": True})


@csrf_exempt
def runtime_settings(request: HttpRequest) -> JsonResponse:
    """Read, or with POST change, token lifetimes, grace, reuse protection and introspection."""
    if request.method == "POST":
        RUNTIME.update(_json_body(request))
    return JsonResponse(RUNTIME.as_dict())


@require_GET
def users(request: HttpRequest) -> JsonResponse:
    """Each user's `sub` (DOT uses the primary key)."""
    rows = get_user_model().objects.values_list("username", "pk")
    return JsonResponse({name: str(pk) for name, pk in rows})
