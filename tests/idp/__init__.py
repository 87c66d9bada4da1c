"""Test identity providers for the whole suite; real servers, not mocks.

- `fixture`: a real django-oauth-toolkit 3.4.1 IdP (the seed-000 provider: public client
  "broker-test", PKCE S256 required, strict rotation, RS256 ID tokens, issuer
  http://127.0.0.1:PORT/o) in its own process, per test: `django_idp_factory`. `issuer=`
  pins the issuer to another origin (tests.faultproxy's `proxied_idp_factory` puts the fault
  proxy there). RFC 7662 introspection at /o/introspect/ also answers for refresh tokens and
  lets the public client ask by its client_id (django_project/introspection.py); both
  discovery documents name it. A second public client, "broker-device" (`device_client_id`),
  is allowed only the device grant (RFC 8628); the RFC 8414 document names the device
  authorization endpoint.
- `browser`: `login()` drives its real login and consent forms the way a browser does;
  `enter_user_code()` signs in at DOT's device page, enters a user code and accepts or
  denies; `Pkce` and `authorize_url()` build requests the way the broker does.
- `netid`: netID-style fakes (seed 001) on aiohttp test servers: `netid_factory`.

Test-only endpoints of the Django IdP (loopback only, no auth):

- GET /test/stats: since the process started (a restart resets them): `token_requests` by
  grant_type (injected faults included), `refresh_ok`, `refresh_failed` by error code,
  `spent_refresh_presented` (a revoked or rotated refresh token was presented, in grace or
  not), `in_grace_replays` (of those, accepted again), `reuse_family_revocations` (of those,
  refused with reuse protection on: DOT revoked the family), `same_pair_returned` (a refresh
  answered with the already-minted pair: an in-grace replay or two requests racing on one
  token), `injected_faults`, `introspection` (requests, and their answers: active, inactive,
  refused, http_N).
- POST /test/faults: {"token_status": 503, "count": N, "body": "..."} answers the next N
  token requests with that status before DOT sees them; {"token_delay": 2.5, "count": N}
  holds the next N answers back after DOT has processed (and committed) them; {"clear": true}.
- POST /test/settings: {"access_token_lifetime": s, "refresh_grace": s, "reuse_protection": b,
  "introspection": b, "device_interval": s (default 1), "device_expires_in": s (default 600)}
  (introspection false: /o/introspect/ refuses the client with 401 invalid_client; the device
  settings apply to device codes issued afterwards).
- GET /test/users: username -> `sub`.

The fixtures live here, so a test module (or conftest.py) imports the ones it uses.
"""

from tests.idp.browser import (
    DeviceResult,
    LoginError,
    LoginResult,
    Pkce,
    authorize_url,
    enter_user_code,
    login,
)
from tests.idp.fixture import DjangoIdP, DjangoIdPFactory, django_idp_factory, start_django_idp
from tests.idp.netid import NetIDFactory, NetIDFake, netid_factory

__all__ = [
    "DeviceResult",
    "DjangoIdP",
    "DjangoIdPFactory",
    "LoginError",
    "LoginResult",
    "NetIDFactory",
    "NetIDFake",
    "Pkce",
    "authorize_url",
    "django_idp_factory",
    "enter_user_code",
    "login",
    "netid_factory",
    "start_django_idp",
]
