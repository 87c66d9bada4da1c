"""Test-only views: a counting, fault-injecting token endpoint and the /test/ controls.

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
from oauth2_provider.views import TokenView  # type: ignore[import-untyped]

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
