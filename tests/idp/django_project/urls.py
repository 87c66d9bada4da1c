"""DOT under /o/ (with the counting token view, the runtime's device authorization view, and
the test IdP's introspection and OpenID discovery views), its RFC 8414 document naming the
introspection and device endpoints, login and /test/."""

from __future__ import annotations

from django.contrib.auth.views import LoginView
from django.urls import URLPattern, URLResolver, include, path, re_path
from oauth2_provider import urls as dot_urls  # type: ignore[import-untyped]

from tests.idp.django_project import introspection, views

_REPLACED = {"token", "introspect", "oidc-connect-discovery-info", "device-authorization"}
_oauth: list[URLPattern | URLResolver] = [
    *(p for p in dot_urls.base_urlpatterns if p.name not in _REPLACED),
    path("token/", views.CountingTokenView.as_view(), name="token"),
    path("introspect/", introspection.IntrospectionView.as_view(), name="introspect"),
    path(
        "device-authorization/",
        views.RuntimeDeviceAuthorizationView.as_view(),
        name="device-authorization",
    ),
    re_path(
        r"^\.well-known/openid-configuration/?$",
        introspection.DiscoveryView.as_view(),
        name="oidc-connect-discovery-info",
    ),
    *(p for p in dot_urls.oidc_urlpatterns if p.name not in _REPLACED),
    # /o/.well-known/oauth-authorization-server; listed first, so it wins over DOT's own.
    path(".well-known/oauth-authorization-server", views.DeviceMetadataView.as_view()),
    *dot_urls.metadata_urlpatterns,
]

urlpatterns: list[URLPattern | URLResolver] = [
    path("o/", include((_oauth, "oauth2_provider"))),
    # RFC 8414's own location for the issuer http://127.0.0.1:PORT/o.
    path(".well-known/oauth-authorization-server/o", views.DeviceMetadataView.as_view()),
    path("accounts/login/", LoginView.as_view(), name="login"),
    path("test/stats", views.stats),
    path("test/faults", views.faults),
    path("test/settings", views.runtime_settings),
    path("test/users", views.users),
]
