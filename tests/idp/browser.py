"""A headless browser for the IdP's login and consent pages, and PKCE helpers for tests.

`login()` does what a person's browser does with the broker's authorize URL: it follows the
IdP's redirects, fills Django's login form (cookies, the CSRF token from the form), submits
DOT's consent form (Authorize, or Cancel when `approve=False`) and stops at the first redirect
to the authorize URL's `redirect_uri`, which it follows only when asked to. It speaks to the
real forms over HTTP with aiohttp, so it can run on the same event loop as a broker under test.

`enter_user_code()` does what a person does with a device login's verification URI (RFC 8628):
opens it, signs in, enters the user code on DOT's device page (or keeps the one the complete
URI filled in) and presses Accept, or Deny when `approve=False`.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import aiohttp

MAX_STEPS = 12
TIMEOUT = aiohttp.ClientTimeout(total=15)


class LoginError(Exception):
    """The IdP answered with something a browser could not get past (an error page, a bad login)."""


@dataclass(frozen=True)
class LoginResult:
    """Where the IdP sent the browser back to, and the callback's answer if it was followed."""

    redirect_url: str
    params: dict[str, str]
    callback_status: int | None = None
    callback_body: str | None = None

    @property
    def code(self) -> str | None:
        return self.params.get("code")

    @property
    def state(self) -> str | None:
        return self.params.get("state")

    @property
    def error(self) -> str | None:
        return self.params.get("error")


@dataclass(frozen=True)
class Pkce:
    """A PKCE verifier and its S256 challenge."""

    verifier: str
    challenge: str

    @classmethod
    def new(cls) -> Pkce:
        verifier = secrets.token_urlsafe(48)
        digest = hashlib.sha256(verifier.encode("ascii")).digest()
        return cls(verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii"))


def authorize_url(
    endpoint: str,
    *,
    client_id: str,
    redirect_uri: str,
    scope: str,
    state: str,
    code_challenge: str | None,
    nonce: str | None = None,
) -> str:
    """An authorization-code request the way the broker builds one (S256 when a challenge)."""
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": scope,
        "state": state,
    }
    if nonce is not None:
        params["nonce"] = nonce
    if code_challenge is not None:
        params |= {"code_challenge": code_challenge, "code_challenge_method": "S256"}
    return f"{endpoint}?{urlencode(params)}"


@dataclass(frozen=True)
class DeviceResult:
    """Where DOT's device pages ended: the heading of its status page ("Device Authorized")."""

    heading: str


@dataclass
class _Form:
    id: str
    action: str
    fields: list[tuple[str, str, str]] = field(default_factory=list)  # (type, name, value)
    buttons: list[tuple[str, str]] = field(default_factory=list)  # (name, value) of submits


class _FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[_Form] = []
        self.headings: list[str] = []
        self.errors: list[str] = []  # the items of Django's form error lists
        self._open: _Form | None = None
        self._text: list[str] | None = None  # collecting an <h1> or an error <li>
        self._in_errors = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {k: v or "" for k, v in attrs}
        if tag == "form":
            self._open = _Form(attr.get("id", ""), attr.get("action", ""))
            self.forms.append(self._open)
        elif tag == "input" and self._open is not None:
            kind = attr.get("type", "text").lower()
            self._open.fields.append((kind, attr.get("name", ""), attr.get("value", "")))
        elif tag == "button" and self._open is not None and attr.get("name"):
            self._open.buttons.append((attr["name"], attr.get("value", "")))
        elif tag == "ul" and "errorlist" in attr.get("class", ""):
            self._in_errors = True
        elif tag == "h1" or (tag == "li" and self._in_errors):
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._open = None
        elif tag == "ul":
            self._in_errors = False
        elif tag in ("h1", "li") and self._text is not None:
            text = " ".join("".join(self._text).split())
            (self.headings if tag == "h1" else self.errors).append(text)
            self._text = None


def _parse(html: str) -> _FormParser:
    parser = _FormParser()
    parser.feed(html)
    return parser


def _forms(html: str) -> list[_Form]:
    return _parse(html).forms


def _same_endpoint(url: str, redirect_uri: str) -> bool:
    a, b = urlsplit(url), urlsplit(redirect_uri)
    return (a.scheme, a.netloc, a.path) == (b.scheme, b.netloc, b.path)


def _fill_login(form: _Form, username: str, password: str) -> dict[str, str]:
    data = {name: value for kind, name, value in form.fields if kind == "hidden" and name}
    return data | {"username": username, "password": password}


def _fill_consent(form: _Form, approve: bool) -> dict[str, str]:
    data = {name: value for kind, name, value in form.fields if kind == "hidden" and name}
    if approve:  # the "Authorize" button is the only named submit; "Cancel" sends nothing
        data.update({name: value for kind, name, value in form.fields if kind == "submit" and name})
    return data


async def login(
    authorize: str,
    username: str,
    password: str,
    *,
    approve: bool = True,
    follow: bool = False,
) -> LoginResult:
    """Log in and answer the consent page; return the redirect to `redirect_uri`."""
    query = parse_qs(urlsplit(authorize).query)
    redirect_uri = query.get("redirect_uri", [""])[0]
    # unsafe=True: aiohttp's jar otherwise drops cookies set by IP-address hosts like 127.0.0.1.
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar, timeout=TIMEOUT) as session:
        url, method, data = authorize, "GET", None
        submitted_login = False
        for _ in range(MAX_STEPS):
            async with session.request(method, url, data=data, allow_redirects=False) as resp:
                body = await resp.text()
                location = resp.headers.get("Location")
            if location is not None and resp.status in (301, 302, 303, 307, 308):
                target = urljoin(url, location)
                if redirect_uri and _same_endpoint(target, redirect_uri):
                    return await _arrive(session, target, follow)
                url, method, data = target, "GET", None
                continue
            if resp.status != 200:
                raise LoginError(f"{method} {url} -> {resp.status}: {body[:500]}")
            url, method, data = _submit(
                url, body, username, password, approve=approve, submitted_login=submitted_login
            )
            submitted_login = submitted_login or "password" in data
        raise LoginError(f"gave up after {MAX_STEPS} steps at {url}")


def _submit(
    url: str, html: str, username: str, password: str, *, approve: bool, submitted_login: bool
) -> tuple[str, str, dict[str, str]]:
    """The next request a person would make on this page: consent, or the login form."""
    forms = _forms(html)
    consent = next((f for f in forms if f.id == "authorizationForm"), None)
    if consent is not None:
        return urljoin(url, consent.action), "POST", _fill_consent(consent, approve)
    login_form = next((f for f in forms if any(n == "password" for _, n, _ in f.fields)), None)
    if login_form is None:
        raise LoginError(f"no form to submit at {url}: {html[:500]}")
    if submitted_login:
        raise LoginError(f"the IdP refused the credentials of {username!r}")
    return urljoin(url, login_form.action), "POST", _fill_login(login_form, username, password)


async def _arrive(session: aiohttp.ClientSession, target: str, follow: bool) -> LoginResult:
    params = {k: v[0] for k, v in parse_qs(urlsplit(target).query).items()}
    if not follow:
        return LoginResult(target, params)
    async with session.get(target, allow_redirects=False) as resp:
        return LoginResult(target, params, resp.status, await resp.text())


async def enter_user_code(
    verification_uri: str,
    username: str,
    password: str,
    *,
    user_code: str | None = None,
    approve: bool = True,
) -> DeviceResult:
    """Sign in at the verification URI, enter the user code, and Accept (or Deny).

    `user_code` may be None when the URI is the complete one, which pre-fills the code. A code
    the page refuses (unknown, expired, used) raises LoginError with the page's error text.
    """
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar, timeout=TIMEOUT) as session:
        url, method, data = verification_uri, "GET", None
        submitted_login = submitted_code = False
        for _ in range(MAX_STEPS):
            async with session.request(method, url, data=data, allow_redirects=False) as resp:
                body = await resp.text()
                location = resp.headers.get("Location")
            if location is not None and resp.status in (301, 302, 303, 307, 308):
                url, method, data = urljoin(url, location), "GET", None
                continue
            if resp.status != 200:
                raise LoginError(f"{method} {url} -> {resp.status}: {body[:500]}")
            page = _parse(body)
            form = page.forms[0] if page.forms else None
            if form is None:
                return DeviceResult(page.headings[0] if page.headings else body[:200])
            names = {name for _, name, _ in form.fields}
            hidden = {name: value for kind, name, value in form.fields if kind == "hidden"}
            action = urljoin(url, form.action)
            if "password" in names:
                if submitted_login:
                    raise LoginError(f"the IdP refused the credentials of {username!r}")
                url, method, data = action, "POST", _fill_login(form, username, password)
                submitted_login = True
            elif "user_code" in names:
                if submitted_code:
                    raise LoginError("the device page refused the code: " + "; ".join(page.errors))
                given = {name: value for _, name, value in form.fields}["user_code"]
                code = user_code if user_code is not None else given
                url, method, data = action, "POST", hidden | {"user_code": code}
                submitted_code = True
            elif ("action", "accept") in form.buttons:
                choice = "accept" if approve else "deny"
                url, method, data = action, "POST", hidden | {"action": choice}
            else:
                raise LoginError(f"no form to submit at {url}: {body[:500]}")
        raise LoginError(f"gave up after {MAX_STEPS} steps at {url}")
