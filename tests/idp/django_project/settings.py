"""Settings of the test IdP, read from TB_IDP_* environment variables that `serve` sets.

Everything here is for a throwaway loopback server: a fast password hasher, signed-cookie
sessions and SQLite in WAL mode with IMMEDIATE transactions, so ~50 concurrent token requests
queue on the write lock (busy timeout) instead of failing with "database is locked".
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from tests.idp.django_project.runtime import RUNTIME

HERE = Path(__file__).resolve().parent
PORT = int(os.environ.get("TB_IDP_PORT", "0"))
KEY_FILE = os.environ.get("TB_IDP_KEY", "")
ISSUER = os.environ.get("TB_IDP_ISSUER") or (f"http://127.0.0.1:{PORT}/o" if PORT else "")

SECRET_KEY = os.environ.get("TB_IDP_SECRET_KEY") or secrets.token_urlsafe(32)
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1"]
ROOT_URLCONF = "tests.idp.django_project.urls"
USE_TZ = True
TIME_ZONE = "UTC"
USE_I18N = False

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.staticfiles",
    "oauth2_provider",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [HERE / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    }
]
STATIC_URL = "/static/"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("TB_IDP_DB", ":memory:"),
        "CONN_MAX_AGE": 0,
        "OPTIONS": {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL",
        },
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"
# Test users only: hashing with PBKDF2's million rounds would cost ~0.3 s per login.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
LOGIN_URL = "/accounts/login/"
DEVICE_PAGE = f"{ISSUER}/device/"

OAUTH2_PROVIDER = {
    "OAUTH2_VALIDATOR_CLASS": "tests.idp.django_project.validator.CountingValidator",
    "SCOPES": {
        "openid": "OpenID Connect",
        "profile": "Your profile",
        "FGO": "FGO",
        "FGOWS": "FGO web services",
    },
    "DEFAULT_SCOPES": ["openid"],
    "PKCE_REQUIRED": True,
    "ROTATE_REFRESH_TOKEN": True,
    # A callable, so POST /test/settings can change it without rebuilding oauthlib's server.
    "ACCESS_TOKEN_EXPIRE_SECONDS": RUNTIME.expires_in,
    "REFRESH_TOKEN_GRACE_PERIOD_SECONDS": RUNTIME.refresh_grace,
    "REFRESH_TOKEN_REUSE_PROTECTION": RUNTIME.reuse_protection,
    "ALLOWED_REDIRECT_URI_SCHEMES": ["http", "https"],
    "OIDC_ENABLED": True,
    "OIDC_RSA_PRIVATE_KEY": Path(KEY_FILE).read_text() if KEY_FILE else "",
    # Pinned rather than derived from each request's Host header, so discovery, the RFC 8414
    # document and every ID token agree byte for byte. Every endpoint URL in both documents
    # takes its origin from it, so an issuer at a proxy's origin routes clients through it.
    "OIDC_ISS_ENDPOINT": ISSUER,
    # RFC 8628: where a person enters the user code (DOT's own page, which pre-fills the code
    # from ?user_code=). The interval and the codes' lifetime come from RUNTIME (views.py).
    "OAUTH_DEVICE_VERIFICATION_URI": DEVICE_PAGE,
    "OAUTH_DEVICE_VERIFICATION_URI_COMPLETE": DEVICE_PAGE + "?user_code={user_code}",
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {
        "django.server": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        "django.request": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
        "oauth2_provider": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
    },
}
