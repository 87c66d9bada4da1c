"""Schemathesis against a live daemon: `token-broker serve` answers as docs/openapi.yaml says.

Each API operation gets its own real daemon (`python -m broker serve`, tests/daemon.py): the TCP
listener on a free loopback port, an admin client and a non-admin client `billing` (may fetch
`techniek/bob` only) that authenticate with bearer tokens, and the provider `techniek` at a real
django-oauth-toolkit IdP. Before the run alice and bob log in at that IdP and their tokens are
imported, so token requests, refreshes and revocations of the document's example grant
(`techniek/alice`) reach a real provider.

Schemathesis then runs the phases of its pytest integration for the operation: the document's
examples, its coverage cases (boundary and negative values, missing auth, unexpected methods)
and generated requests, `MAX_EXAMPLES` of them, derandomized; a bulk import's
application/x-ndjson body is sent as `_ndjson` makes it. Every case is sent as `billing` and
then as the admin. Beside Schemathesis's own checks (status codes, media types, headers and
bodies conform; positive data is accepted and negative data refused; auth is not ignored;
unexpected methods are 405 with Allow) every response must pass this module's checks (a valid
`wait` is capped at 2 seconds, so that a request held for it ends within the client's timeout):

- every 4xx and 5xx is application/problem+json with exactly the Problem fields and a
  documented code (the readiness report `GET /readyz` 503 is the documented exception);
- the only 5xx is 503 `token_unavailable` with a Retry-After;
- no body or header carries a refresh token: not the key `refresh_token`, not one the test
  imported, not the one the request itself sent, not any the store holds when the run ends.

The numbers (operations, requests, statuses, failures, time) are written to the terminal and
to `schemathesis-report.txt` under the module's temporary directory when the module ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
import schemathesis
import structlog
import yaml
from hypothesis import HealthCheck, Phase, settings
from schemathesis.errors import FailureGroup

from tests import conftest
from tests import inprocess as inprocess_module
from tests.daemon import Home, free_port, open_store, request, running_daemon
from tests.idp.browser import Pkce, authorize_url, login
from tests.idp.fixture import DjangoIdP
from tests.inprocess import TECHNIEK_SCOPES

shared_idp = inprocess_module.shared_idp
log = structlog.get_logger("tests.schemathesis")
Case = schemathesis.Case[Any]  # the operation type is generic over parameters and schema

DOCUMENT = Path(__file__).resolve().parents[1] / "docs" / "openapi.yaml"
PROVIDER = "techniek"
PEOPLE = {"alice": "alice-password", "bob": "bob-password"}  # alice is the document's example
REDIRECT = "http://127.0.0.1:9/oauth-callback/"  # DOT ignores the port; nothing listens there
MAX_EXAMPLES = 200  # generated requests per operation, after its examples and coverage cases
REQUEST_TIMEOUT = 15.0  # seconds; a refresh or revocation waits on the IdP
HELD_WAIT = 2  # seconds a generated token request may be held (its `wait`, capped)
DEADLINE = timedelta(seconds=40)  # per example: two requests, each possibly at the IdP
MIN_TELLING_TOKEN = 16  # characters a sent refresh token needs before a leak check looks for it
PROBLEM_FIELDS = {"type", "title", "status", "detail", "code"}
PROBLEM_TYPE = "application/problem+json"


@schemathesis.serializer("application/x-ndjson")
def _ndjson(ctx: Any, value: Any) -> bytes:
    """A bulk import's body as sent. The document's body is text, one import per line, and
    any text is answered 200 with a result per line; a string goes as it is (a lone surrogate,
    which UTF-8 cannot carry, as the bytes a careless encoder would write). A value that is
    not a string (Schemathesis's negative data) goes as what is not text either: its JSON after
    a byte no UTF-8 text holds, which the broker must refuse with 400."""
    del ctx
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return b"\xff" + json.dumps(value).encode()


def _deployed_document() -> dict[str, Any]:
    """The document as the test daemon's deployment would publish it: its providers listed."""
    document: dict[str, Any] = yaml.safe_load(DOCUMENT.read_text(encoding="utf-8"))
    document["components"]["schemas"]["ProviderName"]["enum"] = [PROVIDER]
    return document


# A duplicate import is well-formed yet refused with 400 (the contract has no conflict code),
# and the document's example import is sent more than once.
_CONFIG = {
    "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503"]}},
    "operations": [
        {
            "include-operation-id": "importGrant",
            "checks": {
                "positive_data_acceptance": {
                    "expected-statuses": ["2xx", "400", "401", "403", "404", "409", "5xx"]
                }
            },
        }
    ],
}
DOCUMENTED = _deployed_document()
PROBLEM_CODES = frozenset(DOCUMENTED["components"]["schemas"]["ProblemCode"]["enum"])
EXAMPLE_REFRESH_TOKEN = DOCUMENTED["paths"]["/v1/grants"]["post"]["requestBody"]["content"][
    "application/json"
]["example"]["refresh_token"]
schema = schemathesis.openapi.from_dict(DOCUMENTED, config=schemathesis.Config.from_dict(_CONFIG))


def remember_secret(value: str) -> None:
    """Add a token to the session's end-of-run leak scan (tests/conftest.py)."""
    conftest.SECRETS.add(value)


# -- what the run saw ---------------------------------------------------------------------------


@dataclass
class OperationRun:
    """What one operation's run sent and saw."""

    label: str = ""
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class RunReport:
    """Every operation's run, for the summary at the end of the module."""

    started: float = field(default_factory=time.monotonic)
    runs: list[OperationRun] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The summary: one line per operation and a total."""
        lines = []
        for run in self.runs:
            statuses = " ".join(f"{s}x{n}" for s, n in sorted(run.statuses.items()))
            lines.append(
                f"  {run.label or '(no request)':45} {run.requests:5} requests "
                f"{len(run.failures):2} failures {run.seconds:6.1f}s  [{statuses}]"
            )
        lines.extend(f"  FAILURE {failure}" for run in self.runs for failure in run.failures)
        total = sum(run.requests for run in self.runs)
        failures = sum(len(run.failures) for run in self.runs)
        lines.append(
            f"schemathesis: {len(self.runs)} operations, {total} requests, {failures} failures, "
            f"{time.monotonic() - self.started:.1f}s wall time (max_examples={MAX_EXAMPLES})"
        )
        return lines


@pytest.fixture(scope="module")
def run_report(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunReport]:
    """Collects every operation's numbers; prints and writes the summary when the module ends."""
    report = RunReport()
    yield report
    lines = report.lines()
    path = tmp_path_factory.mktemp("schemathesis") / "schemathesis-report.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    log.info(
        "schemathesis_run",
        operations=len(report.runs),
        requests=sum(run.requests for run in report.runs),
        failures=sum(len(run.failures) for run in report.runs),
        report=str(path),
    )
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
            reporter.write_line("")
            for line in lines:
                reporter.write_line(line)
            reporter.write_line(f"  (written to {path})")


class RecordingSession(requests.Session):
    """A requests session that counts and keeps every response, also those checks send."""

    def __init__(self, run: OperationRun) -> None:
        super().__init__()
        self.run = run
        self.seen: list[tuple[str, dict[str, str]]] = []  # body text and headers

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        """Send, then count and keep the response; remember any access token it serves."""
        response = super().send(request, **kwargs)
        self.run.requests += 1
        self.run.statuses[response.status_code] += 1
        self.seen.append((response.text, dict(response.headers)))
        if response.status_code == 200 and "access_token" in response.text:
            with contextlib.suppress(ValueError, TypeError, KeyError):
                served = response.json()
                if served["user"] in PEOPLE:  # a real token; others are generated strings
                    remember_secret(served["access_token"])
        return response


# -- this module's checks -----------------------------------------------------------------------


def _is_readiness_report(response: schemathesis.Response, case: Case) -> bool:
    return case.operation.path == "/readyz" and response.status_code == 503


def _json_object(response: schemathesis.Response) -> dict[str, Any]:
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError("the body is not JSON") from None
    _require(isinstance(body, dict), "the body is not a JSON object")
    return dict(body)


def _require(condition: bool, message: str) -> None:
    """Fail a check with `message` (a plain raise: pytest's assert rewriting would quote bodies)."""
    if not condition:
        raise AssertionError(message)


def errors_are_problems(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: Case
) -> bool | None:
    """Every 4xx and 5xx is problem+json with exactly the five fields and a documented code."""
    if response.status_code < 400 or _is_readiness_report(response, case):
        return None
    media_type = response.headers.get("content-type", [""])[0].partition(";")[0].strip()
    _require(media_type == PROBLEM_TYPE, f"a {response.status_code} answered as {media_type!r}")
    body = _json_object(response)
    _require(set(body) == PROBLEM_FIELDS, f"the problem's fields are {sorted(body)}")
    _require(body["status"] == response.status_code, "the problem's status is not the response's")
    _require(body["code"] in PROBLEM_CODES, f"undocumented problem code {body['code']!r}")
    _require(body["type"] == f"urn:token-broker:problem:{body['code']}", "the type does not match")
    return None


def server_errors_are_token_unavailable(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: Case
) -> bool | None:
    """The only 5xx is a 503 token_unavailable with Retry-After (or the readiness report)."""
    if response.status_code < 500 or _is_readiness_report(response, case):
        return None
    _require(response.status_code == 503, f"server error {response.status_code}")
    code = _json_object(response).get("code")
    _require(code == "token_unavailable", f"a 503 with code {code!r}")
    retry_after = response.headers.get("retry-after", [""])[0]
    _require(retry_after.isdigit() and int(retry_after) >= 1, "a 503 without Retry-After seconds")
    return None


def no_refresh_token(known: set[str]) -> schemathesis.CheckFunction:
    """A check that no response carries a refresh token: not the key, not a value in `known`,
    not the one its own request sent."""

    def no_refresh_token(
        ctx: schemathesis.CheckContext,
        response: schemathesis.Response,
        case: Case,
    ) -> bool | None:
        body = case.body if isinstance(case.body, dict) else {}
        sent = body.get("refresh_token")
        # A generated token as short as "0" is in any body by chance; only a real one is telling.
        # Nor is one the request also sent as another field (generators repeat values): an
        # answer may name the grant's user or provider.
        echoed = [value for key, value in body.items() if key != "refresh_token"]
        own = (
            {sent}
            if isinstance(sent, str) and len(sent) >= MIN_TELLING_TOKEN and sent not in echoed
            else set()
        )
        leaks(
            response.content.decode(errors="replace"),
            {name: ", ".join(values) for name, values in response.headers.items()},
            known | own,
        )
        return None

    return no_refresh_token


def _keys(value: object) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _keys(item)
    elif isinstance(value, list):
        for item in value:
            yield from _keys(item)


def leaks(body: str, headers: dict[str, str], known: set[str]) -> None:
    """Fail when `body` or `headers` carry a refresh_token key or any of the `known` values.

    The messages never quote the body: it may hold the very value found.
    """
    with contextlib.suppress(ValueError):
        if "refresh_token" in _keys(json.loads(body)):
            raise AssertionError("the body has a refresh_token field")
    for name, value in headers.items():
        if "refresh_token" in f"{name}: {value}".lower().replace("-", "_"):
            raise AssertionError("a header names a refresh_token")
    texts = [body, *headers.values()]
    if any(value in text for value in known for text in texts):
        raise AssertionError("a response carries a refresh token value the test knows")


# -- the live daemon ----------------------------------------------------------------------------


@dataclass
class Live:
    """A serving daemon, its callers and what the run of one operation saw."""

    url: str
    admin: dict[str, str]
    client: dict[str, str]
    session: RecordingSession
    refresh_tokens: set[str]
    bearers: set[str]

    @property
    def run(self) -> OperationRun:
        """This operation's numbers."""
        return self.session.run

    def send(self, case: Case) -> None:
        """Send `case` as the non-admin client, then as the admin, and check both answers."""
        self.run.label = case.operation.label
        _shorten_wait(case)
        checks = [
            errors_are_problems,
            server_errors_are_token_unavailable,
            no_refresh_token(self.refresh_tokens | {EXAMPLE_REFRESH_TOKEN}),
        ]
        for caller, headers in (("billing", self.client), ("admin", self.admin)):
            try:
                case.call_and_validate(
                    base_url=self.url,
                    session=self.session,
                    headers=headers,
                    timeout=REQUEST_TIMEOUT,
                    additional_checks=checks,
                )
            except FailureGroup as group:
                for failure in group.exceptions:
                    self.run.failures.append(
                        f"{case.operation.label} as {caller}: {failure.code} {failure.title}"
                    )
                raise AssertionError(self.scrub(f"as {caller}: {group}")) from None

    def scrub(self, text: str) -> str:
        """`text` without any token or bearer the run knows (failure reports quote bodies)."""
        for value in self.refresh_tokens | self.bearers | conftest.SECRETS:
            text = text.replace(value, "[secret]")
        return text


def _shorten_wait(case: Case) -> None:
    """Cap a valid `wait` at HELD_WAIT seconds: a request whose If-None-Match names the current
    token (`*` does) is held for its whole wait, which must end within REQUEST_TIMEOUT."""
    wait = (case.query or {}).get("wait")
    if isinstance(wait, int) and not isinstance(wait, bool) and 1 <= wait <= 300:
        case.query["wait"] = min(wait, HELD_WAIT)


def _config(home: Home, idp: DjangoIdP, tcp_port: int, admin: str, client: str) -> str:
    def digest(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    return f"""[server]
socket = {json.dumps(str(home.socket))}
socket_mode = "0600"
tcp = "127.0.0.1:{tcp_port}"
callback = ""
metrics = ""

[store]
url = {json.dumps(home.store_url)}
key_file = {json.dumps(str(home.key_file))}

[providers.{PROVIDER}]
issuer = {json.dumps(idp.issuer)}
client_id = {json.dumps(idp.client_id)}
scopes = {json.dumps(list(TECHNIEK_SCOPES))}
redirect_uri = {json.dumps(REDIRECT)}

[[clients]]
name = "schemathesis-admin"
token_sha256 = "{digest(admin)}"
admin = true

[[clients]]
name = "billing"
token_sha256 = "{digest(client)}"
grants = ["{PROVIDER}/bob"]
"""


async def _tokens_at_idp(idp: DjangoIdP, user: str, password: str) -> dict[str, Any]:
    """Log `user` in at the IdP through its real forms and exchange the code for tokens."""
    pkce, state = Pkce.new(), secrets.token_urlsafe(8)
    url = authorize_url(
        idp.authorize_endpoint,
        client_id=idp.client_id,
        redirect_uri=REDIRECT,
        scope=" ".join(TECHNIEK_SCOPES),
        state=state,
        nonce=secrets.token_urlsafe(8),
        code_challenge=pkce.challenge,
    )
    result = await login(url, user, password)
    assert result.state == state
    assert result.code is not None
    form = {
        "grant_type": "authorization_code",
        "code": result.code,
        "redirect_uri": REDIRECT,
        "client_id": idp.client_id,
        "code_verifier": pkce.verifier,
    }
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session,
        session.post(idp.token_endpoint, data=form) as response,
    ):
        assert response.status == 200, f"the IdP's token endpoint answered {response.status}"
        tokens: dict[str, Any] = await response.json()
    for name in ("access_token", "refresh_token", "id_token"):
        if name in tokens:
            remember_secret(tokens[name])
    return tokens


def _import(home: Home, user: str, tokens: dict[str, Any]) -> None:
    """Import a person's real tokens over the Unix socket (as the daemon's own uid: admin)."""
    reply = request(
        home.socket,
        "POST",
        "/v1/grants",
        {
            "provider": PROVIDER,
            "user": user,
            "refresh_token": tokens["refresh_token"],
            "access_token": tokens["access_token"],
            "expires_in": int(tokens["expires_in"]),
            "scope": tokens["scope"],
        },
    )
    assert reply.status == 201, f"importing {user} answered {reply.status}"


async def _stored_refresh_tokens(home: Home) -> set[str]:
    """The refresh tokens the IdP issued that the store holds now (rotated ones included)."""
    async with open_store(home) as repository:
        grants = await repository.all()
    return {
        grant.tokens.refresh_token.reveal()
        for grant in grants
        if grant.user in PEOPLE and grant.tokens.refresh_token is not None
    }


@pytest.fixture
def live(
    shared_idp: DjangoIdP,
    log_dir: Path,
    new_secret: Callable[[str], str],
    run_report: RunReport,
) -> Iterator[Live]:
    """A daemon with real grants of alice and bob, reached over TCP; checked for leaks after."""
    admin, client = new_secret("bearer"), new_secret("bearer")
    run = OperationRun()
    run_report.runs.append(run)
    root = Path(tempfile.mkdtemp(prefix="tb-st-"))  # a Unix socket path must stay short
    try:
        home = Home(root)
        home.generate_keys()
        tcp_port = free_port()
        home.config.write_text(_config(home, shared_idp, tcp_port, admin, client))
        people = {
            user: asyncio.run(_tokens_at_idp(shared_idp, user, pw)) for user, pw in PEOPLE.items()
        }
        imported = {tokens["refresh_token"] for tokens in people.values()}
        with running_daemon(home, log_dir, env={"TOKEN_BROKER_LOG_LEVEL": "info"}):
            for user, tokens in people.items():
                _import(home, user, tokens)
            started = time.monotonic()
            with RecordingSession(run) as session:
                yield Live(
                    url=f"http://127.0.0.1:{tcp_port}",
                    admin={"Authorization": f"Bearer {admin}"},
                    client={"Authorization": f"Bearer {client}"},
                    session=session,
                    refresh_tokens=imported,
                    bearers={admin, client},
                )
            run.seconds = time.monotonic() - started
        stored = asyncio.run(_stored_refresh_tokens(home))
        for value in stored:
            remember_secret(value)
        for body, headers in session.seen:
            leaks(body, headers, imported | stored)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=DEADLINE,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.generate),  # no shrinking: a failure is reported as found
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # one daemon serves all of an operation's examples
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)
def test_the_live_daemon_answers_every_request_as_documented(case: Case, live: Live) -> None:
    """Every request Schemathesis makes of an operation is answered as docs/openapi.yaml says:
    documented statuses, media types, headers and bodies, problem+json errors, no server error
    but a 503 token_unavailable, and never a refresh token."""
    live.send(case)


def test_the_leak_check_catches_a_refresh_token() -> None:
    """The leak check refuses the key refresh_token, a known value in a body or in a header."""
    known = {"rt-known-value"}
    leaks('{"access_token": "at"}', {"Cache-Control": "no-store"}, known)
    for body, headers in (
        ('{"refresh_token": "x"}', {}),
        ('{"detail": "rt-known-value"}', {}),
        ("{}", {"X-Debug": "rt-known-value"}),
        ("{}", {"X-Refresh-Token": "y"}),
        ("{}", {"Set-Cookie": "refresh_token=y"}),
    ):
        with pytest.raises(AssertionError):
            leaks(body, headers, known)
