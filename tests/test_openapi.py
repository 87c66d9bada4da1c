"""docs/openapi.yaml is valid OpenAPI 3.1 and true to the code.

The document's routes are the aiohttp router's routes; its error codes are the codes the API
emits; and real responses, from the in-process API (`served_api`: a real app, store and Unix
socket or loopback TCP listener) and from a whole in-process broker logging in at a real
django-oauth-toolkit IdP, validate against the document's schemas, headers and media types.
`Contract` is the validator; `test_the_validator_*` prove it refuses responses that are wrong.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import copy
import functools
import hashlib
import json
import os
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest
import yaml
from aiohttp import web
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

import broker.api
from broker.api.app import MAX_BODY_BYTES, build_app, build_metrics_app, problems
from broker.api.identity import Policy
from broker.api.problems import OUTCOMES, classify, unauthenticated
from broker.api.server import Limits, start_runner
from broker.config import load_config
from broker.errors import BrokerError
from broker.grants import GrantService
from broker.login import LoginService
from broker.metrics import Metrics
from broker.model import Grant, GrantState, Secret, TokenSet
from broker.store.engine import create_engine
from broker.store.logins import LoginRepository
from broker.store.repository import GrantRepository
from tests import conftest
from tests import inprocess as inprocess_module
from tests.daemon import make_home
from tests.idp.browser import enter_user_code, login
from tests.idp.fixture import DjangoIdP
from tests.inprocess import serving_broker, techniek
from tests.test_api import START, Api, Clock, served_api

shared_idp = inprocess_module.shared_idp

DOCUMENT = Path(__file__).resolve().parents[1] / "docs" / "openapi.yaml"
API_PACKAGE = Path(broker.api.__file__).resolve().parent
DOCUMENT_URI = "urn:token-broker:openapi"
HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
PROVIDER = "techniek"


@functools.cache
def _document_text() -> str:
    return DOCUMENT.read_text(encoding="utf-8")


def load_document() -> dict[str, Any]:
    """A fresh copy of the parsed document."""
    document: dict[str, Any] = yaml.safe_load(_document_text())
    return document


def remember_secret(value: str) -> None:
    """Add a token a test was served to the session's end-of-run leak scan."""
    conftest.SECRETS.add(value)


class HttpReply(Protocol):
    """What the test clients of tests/test_api.py and tests/inprocess.py answer."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def text(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole response, for the clients this module makes itself."""

    status: int
    headers: Mapping[str, str]
    text: str

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.text)


def _escape(token: str) -> str:
    """One JSON Pointer reference token (RFC 6901)."""
    return token.replace("~", "~0").replace("/", "~1")


class Contract:
    """The document as a validator of real responses: status, media type, body and headers.

    Violations name where and which keyword failed, never the value, so a failing test never
    prints a token it was served.
    """

    def __init__(self, document: Mapping[str, Any]) -> None:
        self.document = document
        resource = Resource.from_contents(document, default_specification=DRAFT202012)
        self._registry: Registry[Any] = Registry().with_resource(DOCUMENT_URI, resource)

    def _at(self, pointer: str) -> Any:
        node: Any = self.document
        for token in pointer.split("/")[1:]:
            key = token.replace("~1", "/").replace("~0", "~")
            node = node[int(key)] if isinstance(node, list) else node[key]
        return node

    def _resolve(self, pointer: str) -> tuple[dict[str, Any], str]:
        """The object at `pointer`, following OpenAPI $refs; and where it really is."""
        node = self._at(pointer)
        while "$ref" in node:
            pointer = node["$ref"].removeprefix("#")
            node = self._at(pointer)
        return node, pointer

    def _schema_errors(self, pointer: str, instance: object) -> list[str]:
        validator = Draft202012Validator(
            {"$ref": f"{DOCUMENT_URI}#{pointer}"}, registry=self._registry
        )
        return [
            f"{error.json_path}: fails {error.validator!r}"
            for error in validator.iter_errors(instance)
        ]

    def violations(self, method: str, path: str, reply: HttpReply) -> list[str]:
        """How `reply` to `method path` (a documented path template) disagrees with the document."""
        operation = f"/paths/{_escape(path)}/{method.lower()}"
        responses, _ = self._resolve(f"{operation}/responses")
        if str(reply.status) not in responses:
            return [f"{method} {path} does not document status {reply.status}"]
        return self._response_violations(f"{operation}/responses/{reply.status}", reply)

    def component_violations(self, name: str, reply: HttpReply) -> list[str]:
        """How `reply` disagrees with the response component `name`."""
        return self._response_violations(f"/components/responses/{_escape(name)}", reply)

    def _response_violations(self, pointer: str, reply: HttpReply) -> list[str]:
        response, pointer = self._resolve(pointer)
        found: list[str] = []
        fields = {name.lower(): value for name, value in reply.headers.items()}
        content = response.get("content", {})
        media_type = fields.get("content-type", "").partition(";")[0].strip().lower()
        if content and media_type not in content:
            found.append(f"Content-Type {media_type or '(none)'} is not one of {sorted(content)}")
        elif content:
            body: object = reply.text
            if media_type.endswith("json"):
                try:
                    body = json.loads(reply.text)
                except ValueError:
                    return [*found, "the body is not JSON"]
            schema_pointer = f"{pointer}/content/{_escape(media_type)}/schema"
            found += [f"body {error}" for error in self._schema_errors(schema_pointer, body)]
        elif reply.text:
            found.append("the document says no body, but there is one")
        for name in response.get("headers", {}):
            header, header_pointer = self._resolve(f"{pointer}/headers/{_escape(name)}")
            value = fields.get(name.lower())
            if value is None:
                if header.get("required", False):
                    found.append(f"header {name} is missing")
                continue
            instance: object = value
            if header["schema"].get("type") == "integer":
                try:
                    instance = int(value)
                except ValueError:
                    found.append(f"header {name} is not an integer")
                    continue
            errors = self._schema_errors(f"{header_pointer}/schema", instance)
            found += [f"header {name} {error}" for error in errors]
        return found

    def problem_codes(self) -> set[str]:
        """The codes the ProblemCode schema lists."""
        return set(self.document["components"]["schemas"]["ProblemCode"]["enum"])

    def problem_pairs(self) -> set[tuple[int, str]]:
        """(status, code) of every problem response the document describes."""
        pairs = set()
        for response in self.document["components"]["responses"].values():
            media = response.get("content", {}).get("application/problem+json")
            if media is None:
                continue
            fixed = media["schema"]["allOf"][1]["properties"]
            codes = fixed["code"].get("enum") or [fixed["code"]["const"]]
            pairs |= {(fixed["status"]["const"], code) for code in codes}
        return pairs


@pytest.fixture(scope="module")
def contract() -> Contract:
    """The document as a response validator."""
    return Contract(load_document())


def assert_conforms(contract: Contract, method: str, path: str, reply: HttpReply) -> None:
    """`reply` to `method path` is what the document says it is."""
    found = contract.violations(method, path, reply)
    assert not found, f"{method} {path} answered {reply.status}, against the document: {found}"


def assert_component(contract: Contract, name: str, reply: HttpReply) -> None:
    """`reply` is what the response component `name` says it is."""
    found = contract.component_violations(name, reply)
    assert not found, f"response {reply.status} against components/responses/{name}: {found}"


# -- the document itself ------------------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1() -> None:
    """docs/openapi.yaml passes openapi-spec-validator as OpenAPI 3.1."""
    document = load_document()
    assert document["openapi"].startswith("3.1.")
    validate_openapi(document)


def _schemas(node: object) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _schemas(value)
    elif isinstance(node, list):
        for value in node:
            yield from _schemas(value)


def test_every_pattern_compiles_and_is_anchored() -> None:
    """Every `pattern` compiles and is anchored at both ends, so it constrains the whole value."""
    patterns = [
        node["pattern"]
        for node in _schemas(load_document())
        if isinstance(node.get("pattern"), str)
    ]
    assert len(patterns) >= 6
    for pattern in patterns:
        re.compile(pattern)
        if pattern != "^Bearer ":  # a header prefix, followed by the realm
            assert pattern.startswith("^"), pattern
            assert pattern.endswith("$"), pattern


def test_name_patterns_are_the_models() -> None:
    """The document's provider and user patterns accept exactly what broker.model accepts."""
    from broker.model import PROVIDER_RE, USER_RE

    schemas = load_document()["components"]["schemas"]
    for name, model in (("ProviderName", PROVIDER_RE), ("UserLabel", USER_RE)):
        assert schemas[name]["pattern"] == f"^{model.pattern}$"


def test_the_token_value_pattern_refuses_exactly_pythons_whitespace() -> None:
    """TokenValue's pattern refuses a value with any character that str.isspace matches."""
    pattern = re.compile(load_document()["components"]["schemas"]["TokenValue"]["pattern"])
    for code in range(0x3100):
        char = chr(code)
        assert (pattern.fullmatch(f"a{char}b") is None) is char.isspace(), hex(code)


# -- the router and the document ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def _built_app(root: Path) -> AsyncIterator[web.Application]:
    """The API application built from a test config, as the daemon builds it (not served)."""
    home = make_home(root)
    config = load_config(home.config)
    engine = create_engine(home.store_url)
    try:
        repository = GrantRepository(engine, home.keyring())
        clock = Clock(START)
        service = GrantService(repository, config.providers, clock=clock)

        async def ready() -> list[str]:
            return []

        yield build_app(
            service=service,
            logins=LoginService(LoginRepository(engine, repository.sealer), service, {}),
            metrics=Metrics(config.providers),
            policy=Policy(config.clients, os.getuid()),
            clock=clock,
            readiness=ready,
        )
    finally:
        await engine.dispose()


def _routes(app: web.Application) -> set[tuple[str, str]]:
    return {
        (route.resource.canonical, route.method) for route in app.router.routes() if route.resource
    }


def _documented() -> set[tuple[str, str]]:
    return {
        (path, method.upper())
        for path, item in load_document()["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


async def test_the_routers_routes_are_the_documented_operations(tmp_path: Path) -> None:
    """Every route of build_app is documented with its method, and every operation is routed."""
    async with _built_app(tmp_path) as app:
        routed = _routes(app)
    without_head = {(path, method) for path, method in routed if method != "HEAD"}
    assert without_head == _documented()


async def test_every_get_route_also_answers_head_as_the_document_says(tmp_path: Path) -> None:
    """HEAD is routed for exactly the GET paths, which the document's description promises."""
    async with _built_app(tmp_path) as app:
        routed = _routes(app)
    heads = {path for path, method in routed if method == "HEAD"}
    assert heads == {path for path, method in routed if method == "GET"}
    assert (
        "**HEAD.** Every `GET` route also answers `HEAD`" in load_document()["info"]["description"]
    )


def test_the_metrics_listeners_routes_are_documented_too() -> None:
    """The server.metrics listener serves only documented, public operations."""
    app = build_metrics_app(Metrics(["techniek"]))
    routed = {(path, method) for path, method in _routes(app) if method != "HEAD"}
    assert routed <= _documented()
    for path, method in routed:
        assert load_document()["paths"][path][method.lower()]["security"] == []


# -- error codes: the document's and the code's -------------------------------------------------


def _subclasses(cls: type[BrokerError]) -> Iterator[type[BrokerError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _classified_codes() -> set[tuple[int, str]]:
    """(status, code) that broker.api.problems gives every BrokerError class."""
    classes: list[type[BrokerError]] = [BrokerError, *_subclasses(BrokerError)]
    # classify() looks only at the class, so the instances need not be initialised.
    return {classify(cls.__new__(cls))[:2] for cls in classes}


@contextlib.asynccontextmanager
async def _served(app: web.Application, limits: Limits | None = None) -> AsyncIterator[str]:
    """`app` served the daemon's way on a loopback port; its base URL."""
    async with contextlib.AsyncExitStack() as stack:
        runner = await start_runner(stack, app, limits)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = next(a for a in runner.addresses if isinstance(a, tuple))[:2]
        yield f"http://{host}:{port}"


async def _fetch(
    url: str,
    method: str = "GET",
    *,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    timeout = aiohttp.ClientTimeout(total=15)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.request(method, url, data=data, headers=headers) as response,
    ):
        return Reply(response.status, dict(response.headers), await response.text())


async def _internal_error_reply() -> Reply:
    """What the problems middleware answers when a handler fails unexpectedly."""

    async def broken(_request: web.Request) -> web.Response:
        raise RuntimeError("a handler bug")

    app = web.Application(middlewares=[problems])
    app.router.add_get("/broken", broken)
    async with _served(app) as url:
        return await _fetch(url + "/broken")


async def _request_timeout_reply() -> Reply:
    """What a listener answers a request whose body does not arrive in time."""

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    app = web.Application(middlewares=[problems])
    app.router.add_post("/slow", echo)
    async with _served(app, Limits(body_timeout=0.2)) as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            # The head promises ten bytes of body; none come.
            writer.write(
                b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 10\r\n\r\n"
            )
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    status_line, *fields = head.split("\r\n")
    headers = dict(field.split(": ", 1) for field in fields)
    return Reply(int(status_line.split()[1]), headers, body)


async def _routing_replies(api: Api) -> list[Reply]:
    """The API's answers to no route, a wrong method and a body over 64 KiB."""
    too_big = json.dumps({"provider": PROVIDER, "padding": "x" * MAX_BODY_BYTES}).encode()
    replies = [
        await api.call("GET", "/v2/nothing"),
        await api.call("DELETE", "/healthz"),
        await api.call(
            "POST", "/v1/grants", data=too_big, headers={"Content-Type": "application/json"}
        ),
    ]
    return [Reply(r.status, r.headers, r.text) for r in replies]


async def test_the_documented_error_codes_are_the_codes_the_api_emits(
    tmp_path: Path, contract: Contract
) -> None:
    """ProblemCode lists exactly the codes the API can emit, each with its documented status."""
    emitted = _classified_codes()
    emitted.add((401, json.loads(unauthenticated("x").text or "{}")["code"]))
    async with served_api(tmp_path) as api:
        replies = await _routing_replies(api)
    replies += [await _internal_error_reply(), await _request_timeout_reply()]
    emitted |= {(reply.status, reply.json()["code"]) for reply in replies}
    assert {code for _, code in emitted} == contract.problem_codes()
    assert emitted <= contract.problem_pairs()
    assert set(OUTCOMES) <= contract.problem_codes()


def _literal_problem_codes() -> set[str]:
    """Codes written as literals in problem(...) calls anywhere in broker/api."""
    codes = set()
    for path in API_PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "problem"
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
            ):
                codes.add(node.args[1].value)
    return codes


def test_every_problem_code_written_in_broker_api_is_documented(contract: Contract) -> None:
    """A code that any problem(...) call in broker/api spells out is in the ProblemCode enum."""
    codes = _literal_problem_codes()
    assert {"internal_error", "unauthenticated"} <= codes  # the scan finds the known ones
    assert codes <= contract.problem_codes()


async def test_routing_errors_are_the_documented_problems(
    tmp_path: Path, contract: Contract
) -> None:
    """No route, a wrong method, a body too big, a slow body and a handler bug each answer the
    documented problem response, the 405 with an Allow header."""
    async with served_api(tmp_path) as api:
        not_found, wrong_method, too_big = await _routing_replies(api)
    assert_component(contract, "NotFound", not_found)
    assert_component(contract, "MethodNotAllowed", wrong_method)
    assert "GET" in wrong_method.headers["Allow"]
    assert_component(contract, "PayloadTooLarge", too_big)
    assert_component(contract, "RequestTimeout", await _request_timeout_reply())
    internal = await _internal_error_reply()
    assert_component(contract, "InternalError", internal)
    assert "a handler bug" not in internal.text


# -- real responses against the document --------------------------------------------------------

TOKEN = "/v1/tokens/{provider}/{user}"
GRANTS = "/v1/grants"
GRANT = "/v1/grants/{provider}/{user}"
REFRESH = "/v1/grants/{provider}/{user}/refresh"
LOGINS = "/v1/logins"
LOGIN = "/v1/logins/{login_id}"


async def _import(api: Api, new_secret: Callable[[str], str], user: str, **fields: object) -> None:
    reply = await api.import_grant(
        provider=PROVIDER, user=user, refresh_token=new_secret("rt"), **fields
    )
    assert reply.status == 201, reply.text


async def _insert_without_refresh_token(api: Api, user: str, access: str) -> Grant:
    grant = Grant(
        id="",
        provider=PROVIDER,
        user=user,
        state=GrantState.ACTIVE,
        generation=0,
        tokens=TokenSet(access_token=Secret(access)),
        scopes=("openid",),
        access_expires_at=api.clock() + timedelta(seconds=60),
    )
    stored = await api.repository.insert(grant, api.clock())
    await api.service.load()
    return stored


async def test_token_responses_conform(
    tmp_path: Path, contract: Contract, new_secret: Callable[[str], str]
) -> None:
    """GET /v1/tokens answers 200, 400, 404, 409 and 503 exactly as documented."""
    async with served_api(tmp_path) as api:
        await _import(api, new_secret, "alice", access_token=new_secret("at"), expires_in=3600)
        await _import(api, new_secret, "unrefreshed")
        await _insert_without_refresh_token(api, "carol", new_secret("at"))
        api.clock.advance(61)  # carol's token expired and she has no refresh token
        served = await api.call("GET", "/v1/tokens/techniek/alice?min_ttl=60")
        assert served.status == 200
        assert_conforms(contract, "GET", TOKEN, served)
        cases = {
            "/v1/tokens/techniek/alice?min_ttl=x": 400,
            "/v1/tokens/techniek/nobody": 404,
            "/v1/tokens/techniek/carol": 409,
            "/v1/tokens/techniek/unrefreshed": 503,
        }
        for path, status in cases.items():
            reply = await api.call("GET", path)
            assert reply.status == status, reply.text
            assert_conforms(contract, "GET", TOKEN, reply)


async def test_admin_responses_conform(
    tmp_path: Path, contract: Contract, new_secret: Callable[[str], str]
) -> None:
    """Grant listing, import (201, 200, 400), views, refresh (400, 409, 503) and revoke answer
    as documented."""
    async with served_api(tmp_path) as api:
        created = await api.import_grant(
            provider=PROVIDER, user="alice", refresh_token=new_secret("rt"), scope="openid"
        )
        assert created.status == 201
        assert_conforms(contract, "POST", GRANTS, created)
        replaced = await api.import_grant(
            provider=PROVIDER,
            user="alice",
            refresh_token=new_secret("rt"),
            access_token=new_secret("at"),
            expires_in=600,
            force=True,
        )
        assert replaced.status == 200
        assert_conforms(contract, "POST", GRANTS, replaced)
        for body in ({"provider": "nowhere", "user": "x", "refresh_token": "y"}, {"user": 1}):
            refused = await api.call("POST", GRANTS, body=body)
            assert refused.status == 400
            assert_conforms(contract, "POST", GRANTS, refused)
        stored = await _insert_without_refresh_token(api, "carol", new_secret("at"))

        listing = await api.call("GET", GRANTS)
        assert [g["user"] for g in listing.json()] == ["alice", "carol"]
        assert_conforms(contract, "GET", GRANTS, listing)
        for path, status in (("/v1/grants/techniek/alice", 200), ("/v1/grants/techniek/x", 404)):
            reply = await api.call("GET", path)
            assert reply.status == status
            assert_conforms(contract, "GET", GRANT, reply)

        # served_api runs no refresher: a refresh it cannot do now is 503 with Retry-After.
        for user, status in (("alice", 503), ("carol", 409), ("nobody", 404)):
            reply = await api.call("POST", f"/v1/grants/techniek/{user}/refresh")
            assert reply.status == status, reply.text
            assert_conforms(contract, "POST", REFRESH, reply)
        await api.repository.replace_tokens(
            replace(stored, state=GrantState.REAUTH_REQUIRED, last_error="refused"),
            stored.generation,
            api.clock(),
        )
        await api.service.load()
        needs_login = await api.call("POST", "/v1/grants/techniek/carol/refresh")
        assert needs_login.status == 409
        assert_conforms(contract, "POST", REFRESH, needs_login)

        for user, status in (("alice", 200), ("alice", 404)):
            reply = await api.call("DELETE", f"/v1/grants/techniek/{user}")
            assert reply.status == status
            assert_conforms(contract, "DELETE", GRANT, reply)


_IMPORT = b'{"provider": "techniek", "user": "mallory", "refresh_token": "rt-abcd"'


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (GRANTS, b'{"provider": "t\xe9chniek"}'),
        (GRANTS, _IMPORT + b', "scope": NaN}'),
        (GRANTS, _IMPORT + b', "access_token": "at-abcd", "expires_in": 1e999}'),
        (GRANTS, b'{"provider": "techniek", "user": "a\\ud800", "refresh_token": "rt-abcd"}'),
        (LOGINS, b'{"provider": "techniek", "user": "a\\udfff"}'),
        pytest.param(
            GRANTS,
            b'{"provider": "techniek", "user": "mallory", "refresh_token": "rt\\ud800"}',
        ),
        pytest.param(
            GRANTS,
            _IMPORT + b', "access_token": "at\\udfff", "expires_in": 60}',
        ),
        pytest.param(GRANTS, _IMPORT + b', "scope": "openid \\ud800"}'),
        pytest.param(GRANTS, b"[" * 60_000),
        pytest.param(LOGINS, b'{"provider": ' + b"[" * 60_000 + b"}"),
    ],
    ids=[
        "latin-1-bytes",
        "nan-scope",
        "infinite-expires-in",
        "surrogate-user",
        "surrogate-login-user",
        "surrogate-refresh-token",
        "surrogate-access-token",
        "surrogate-scope",
        "nested-import",
        "nested-login",
    ],
)
async def test_hostile_bodies_are_documented_400_problems(
    tmp_path: Path, contract: Contract, path: str, body: bytes
) -> None:
    """A body that is not the JSON the operation takes is a documented 400 bad_request."""
    async with served_api(tmp_path) as api:
        reply = await api.call(
            "POST", path, data=body, headers={"Content-Type": "application/json"}
        )
        assert reply.status == 400, f"answered {reply.status}"
        assert_conforms(contract, "POST", path, reply)


async def test_a_request_head_over_the_limits_is_a_400_problem(
    tmp_path: Path, contract: Contract
) -> None:
    """A header line longer than the listener accepts is refused with a 400 problem."""
    async with served_api(tmp_path, tcp=True) as api:
        assert api.tcp_url is not None
        host, port = api.tcp_url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
    head, _, text = raw.decode(errors="replace").partition("\r\n\r\n")
    status_line, *fields = head.split("\r\n")
    reply = Reply(int(status_line.split()[1]), dict(f.split(": ", 1) for f in fields), text)
    assert reply.status == 400
    assert_component(contract, "BadRequest", reply)


async def test_login_errors_conform(tmp_path: Path, contract: Contract) -> None:
    """POST /v1/logins refuses bad input with 400 and an unknown login id is a documented 404."""
    async with served_api(tmp_path) as api:
        for body in ({"provider": "nowhere", "user": "alice"}, {"provider": PROVIDER}, [1]):
            reply = await api.call("POST", LOGINS, body=body)
            assert reply.status == 400
            assert_conforms(contract, "POST", LOGINS, reply)
        missing = await api.call("GET", "/v1/logins/no-such-login")
        assert missing.status == 404
        assert_conforms(contract, "GET", LOGIN, missing)


async def test_public_responses_conform(tmp_path: Path, contract: Contract) -> None:
    """/healthz, /readyz (200 and 503) and /metrics (both formats) answer as documented."""
    async with served_api(tmp_path) as api:
        for path in ("/healthz", "/readyz", "/metrics"):
            reply = await api.call("GET", path)
            assert reply.status == 200
            assert_conforms(contract, "GET", path, reply)
        openmetrics = await api.call(
            "GET", "/metrics", headers={"Accept": "application/openmetrics-text"}
        )
        assert openmetrics.headers["Content-Type"].startswith("application/openmetrics-text")
        assert_conforms(contract, "GET", "/metrics", openmetrics)
        api.config.store.key_file.unlink()
        unready = await api.call("GET", "/readyz")
        assert unready.status == 503
        assert_conforms(contract, "GET", "/readyz", unready)


async def test_tcp_authentication_and_authorization_problems_conform(
    tmp_path: Path, contract: Contract, new_secret: Callable[[str], str]
) -> None:
    """On TCP, a missing bearer is the documented 401 on every operation and a non-admin client
    gets the documented 403 on every admin operation and on a grant it may not have."""
    bearer = new_secret("bearer")
    client = {
        "name": "billing",
        "token_sha256": hashlib.sha256(bearer.encode()).hexdigest(),
        "grants": ["netid/*"],
    }
    auth = {"Authorization": f"Bearer {bearer}"}
    requests = [
        ("GET", TOKEN, "/v1/tokens/techniek/alice", None),
        ("GET", GRANTS, GRANTS, None),
        ("POST", GRANTS, GRANTS, {"provider": PROVIDER, "user": "a", "refresh_token": "b"}),
        ("GET", GRANT, "/v1/grants/techniek/alice", None),
        ("DELETE", GRANT, "/v1/grants/techniek/alice", None),
        ("POST", REFRESH, "/v1/grants/techniek/alice/refresh", None),
        ("POST", LOGINS, LOGINS, {"provider": PROVIDER, "user": "alice"}),
        ("GET", LOGIN, "/v1/logins/abc", None),
    ]
    async with served_api(tmp_path, clients=[client], tcp=True) as api:
        for method, template, path, body in requests:
            anonymous = await api.call(method, path, body=body, tcp=True)
            assert anonymous.status == 401
            assert_conforms(contract, method, template, anonymous)
            refused = await api.call(method, path, body=body, headers=auth, tcp=True)
            assert refused.status == 403
            assert_conforms(contract, method, template, refused)
        public = await api.call("GET", "/healthz", tcp=True)
        assert_conforms(contract, "GET", "/healthz", public)


async def test_a_login_and_the_grant_it_makes_conform_end_to_end(
    tmp_path: Path, log_dir: Path, contract: Contract, shared_idp: DjangoIdP
) -> None:
    """Against a real IdP: a login (201, pending, complete, failed), its token, its grant, a real
    refresh and a real revocation all answer as the document says."""
    async with serving_broker(tmp_path, log_dir, {PROVIDER: techniek(shared_idp)}) as broker:
        started = await broker.call("POST", LOGINS, {"provider": PROVIDER, "user": "alice"})
        assert started.status == 201, started.text
        assert_conforms(contract, "POST", LOGINS, started)
        login_id, authorize_url = started.json()["login_id"], started.json()["authorize_url"]
        pending = await broker.call("GET", f"/v1/logins/{login_id}")
        assert pending.json()["state"] == "pending"
        assert_conforms(contract, "GET", LOGIN, pending)
        arrival = await login(authorize_url, "alice", "alice-password", follow=True)
        assert arrival.callback_status == 200, arrival.callback_body
        complete = await broker.call("GET", f"/v1/logins/{login_id}")
        assert complete.json()["state"] == "complete"
        assert_conforms(contract, "GET", LOGIN, complete)

        served = await broker.call("GET", "/v1/tokens/techniek/alice")
        assert served.status == 200
        remember_secret(served.json()["access_token"])
        assert_conforms(contract, "GET", TOKEN, served)
        grant = await broker.call("GET", "/v1/grants/techniek/alice")
        assert grant.json()["sub"] == shared_idp.subs["alice"]
        assert_conforms(contract, "GET", GRANT, grant)
        refreshed = await broker.call("POST", "/v1/grants/techniek/alice/refresh")
        assert refreshed.json()["generation"] > grant.json()["generation"]
        assert_conforms(contract, "POST", REFRESH, refreshed)
        revoked = await broker.call("DELETE", "/v1/grants/techniek/alice")
        assert revoked.json()["revoked_at_provider"] is True
        assert_conforms(contract, "DELETE", GRANT, revoked)

        refused = await broker.call("POST", LOGINS, {"provider": PROVIDER, "user": "bob"})
        denied = await login(refused.json()["authorize_url"], "bob", "bob-password", approve=False)
        await broker.callback(denied.redirect_url)
        failed = await broker.call("GET", f"/v1/logins/{refused.json()['login_id']}")
        assert failed.json()["state"] == "failed"
        assert failed.json()["error"]
        assert_conforms(contract, "GET", LOGIN, failed)


async def test_a_device_login_conforms_when_started_joined_and_ended(
    tmp_path: Path, log_dir: Path, contract: Contract, shared_idp: DjangoIdP
) -> None:
    """Against a real IdP: a device login's 201, the 201 of a second one joining it, its pending
    and complete states, and the 400 for a method there is not, answer as the document says."""
    provider = techniek(shared_idp, client_id=shared_idp.device_client_id)
    body = {"provider": PROVIDER, "user": "alice", "method": "device"}
    async with serving_broker(tmp_path, log_dir, {PROVIDER: provider}) as broker:
        started = await broker.call("POST", LOGINS, body)
        assert started.status == 201, started.text
        assert_conforms(contract, "POST", LOGINS, started)
        conftest.SECRETS.add(started.json()["user_code"])
        joined = await broker.call("POST", LOGINS, body)
        assert joined.status == 201, joined.text
        assert_conforms(contract, "POST", LOGINS, joined)
        login_id = started.json()["login_id"]
        pending = await broker.call("GET", f"/v1/logins/{login_id}")
        assert pending.json()["state"] == "pending"
        assert_conforms(contract, "GET", LOGIN, pending)
        await enter_user_code(
            started.json()["verification_uri_complete"], "alice", "alice-password"
        )
        for _ in range(100):
            complete = await broker.call("GET", f"/v1/logins/{login_id}")
            if complete.json()["state"] != "pending":
                break
            await asyncio.sleep(0.1)
        assert complete.json()["state"] == "complete", complete.text
        assert_conforms(contract, "GET", LOGIN, complete)
        unknown = await broker.call("POST", LOGINS, body | {"method": "implicit"})
        assert unknown.status == 400
        assert_conforms(contract, "POST", LOGINS, unknown)


# -- the validator refuses wrong responses -------------------------------------------------------


DROP = object()  # a change that removes the field or header


def _changed(base: Mapping[str, object], changes: Mapping[str, object]) -> dict[str, object]:
    result = dict(base) | {k: v for k, v in changes.items() if v is not DROP}
    return {k: v for k, v in result.items() if changes.get(k) is not DROP}


def _token_reply(
    body: Mapping[str, object] | None = None, headers: Mapping[str, object] | None = None
) -> Reply:
    """A token response as documented, with `body` and `headers` changed."""
    good_body = {
        "access_token": "at-example",
        "token_type": "Bearer",
        "expires_in": 3600,
        "expires_at": "2030-01-02T04:04:05Z",
        "scope": "openid profile",
        "provider": PROVIDER,
        "user": "alice",
    }
    good_headers = {
        "Content-Type": "application/json",
        "Cache-Control": "no-store",
        "Pragma": "no-cache",
        "ETag": '"0123456789abcdef.7"',
    }
    fields = _changed(good_headers, headers or {})
    return Reply(
        200,
        {k: str(v) for k, v in fields.items()},
        json.dumps(_changed(good_body, body or {})),
    )


def _problem_reply(status: int, code: str, headers: Mapping[str, str] | None = None) -> Reply:
    """A problem response with this status and code."""
    body = {
        "type": f"urn:token-broker:problem:{code}",
        "title": "A title",
        "status": status,
        "detail": "what went wrong",
        "code": code,
    }
    fields = {"Content-Type": "application/problem+json", "Cache-Control": "no-store"}
    return Reply(status, fields | dict(headers or {}), json.dumps(body))


def test_the_validator_accepts_the_documented_shapes(contract: Contract) -> None:
    """The hand-made control responses are right as they stand, so the next test's failures are
    caused by each single change it makes."""
    assert not contract.violations("GET", TOKEN, _token_reply())
    assert not contract.violations(
        "GET", TOKEN, _problem_reply(503, "token_unavailable", {"Retry-After": "30"})
    )


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (_token_reply({"expires_at": DROP}), "required"),
        (_token_reply({"refresh_token": "rt-example"}), "additionalProperties"),
        (_token_reply({"expires_at": "2030-01-02T04:04:05+00:00"}), "pattern"),
        (_token_reply({"expires_in": "3600"}), "type"),
        (_token_reply(headers={"Cache-Control": DROP}), "header Cache-Control is missing"),
        (_token_reply(headers={"Cache-Control": "max-age=60"}), "header Cache-Control"),
        (_token_reply(headers={"Content-Type": "text/html"}), "Content-Type text/html"),
        (_token_reply(headers={"ETag": DROP}), "header ETag is missing"),
        (_token_reply(headers={"ETag": "at-example"}), "header ETag"),
        (_problem_reply(503, "token_unavailable"), "header Retry-After is missing"),
        (_problem_reply(503, "token_unavailable", {"Retry-After": "soon"}), "not an integer"),
        (_problem_reply(409, "token_unavailable"), "const"),
        (_problem_reply(409, "something_new"), "enum"),
        (_problem_reply(418, "bad_request"), "does not document status 418"),
        (
            Reply(404, {"Content-Type": "application/json", "Cache-Control": "no-store"}, "{}"),
            "Content-Type application/json",
        ),
    ],
    ids=[
        "missing-field",
        "refresh-token-field",
        "offset-not-z",
        "string-number",
        "no-cache-control",
        "cacheable",
        "html",
        "no-etag",
        "etag-not-a-generation",
        "503-without-retry-after",
        "retry-after-not-seconds",
        "wrong-code-for-status",
        "unknown-code",
        "undocumented-status",
        "error-as-plain-json",
    ],
)
def test_the_validator_refuses_a_wrong_response(
    contract: Contract, reply: Reply, expected: str
) -> None:
    """A response that differs from the document in one way is refused, naming that way."""
    found = contract.violations("GET", TOKEN, reply)
    assert any(expected in violation for violation in found), found


def test_the_validator_sees_a_changed_document() -> None:
    """Validation reads the document: narrowing a schema there turns a good response bad."""
    document = copy.deepcopy(load_document())
    document["components"]["schemas"]["Token"]["properties"]["scope"]["maxLength"] = 3
    assert not Contract(load_document()).violations("GET", TOKEN, _token_reply())
    assert Contract(document).violations("GET", TOKEN, _token_reply())
