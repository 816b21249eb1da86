"""The HTTP layer of `pixart serve` under the routes: the API key and body size checked before a route reads the body,
errors in OpenAI's envelope saying what to send, and request counts for /metrics."""
from __future__ import annotations

import hmac
import json
import re
from typing import Any, Callable

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from .worker import ApiError, Metrics


def check_key(api_key: str | None, authorization: str | None) -> None:
    """Raise 401 unless `authorization` is "Bearer <api_key>" (or no key is set)."""
    if api_key is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send the header `Authorization: Bearer KEY`",
                       type="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class Json(JSONResponse):
    """JSON as RFC 8259 has it, whatever a request held: no NaN or Infinity (an error instead of a body that
    JSON.parse refuses), and ASCII (a lone surrogate echoed from a request cannot break the UTF-8 encoding)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return Json(e.body(), status_code=e.status, headers=e.headers)


# the forms of the fields that take several, for messages
FORMS = {"cache": "a preset name (fast, faster, fastest), a threshold such as 0.1, [threshold, max_reuse] or null",
         "guidance_interval": "[sigma_lo, sigma_hi], such as [0.28, 5.42], or null"}
JSON_BODY = "send a JSON object in UTF-8 with the header Content-Type: application/json"


async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    errors = e.errors()
    first, kind = errors[0], errors[0].get("type")
    loc = [str(p) for p in first["loc"] if p != "body"]
    if kind == "json_invalid":
        reason, at = (first.get("ctx") or {}).get("error", "a syntax error"), f" at character {loc[0]}" if loc else ""
        return await _api_error(request, ApiError(400, f"the body is not valid JSON ({reason}{at}): {JSON_BODY}",
                                                  code=kind))
    if not loc:  # the body as a whole
        what = "the body is missing" if kind == "missing" else "the body is not a JSON object"
        return await _api_error(request, ApiError(400, f"{what}: {JSON_BODY}", code=kind))
    field = loc[0]
    kinds = [err["type"] for err in errors if [p for p in err["loc"] if p != "body"][:1] == [field]]
    if "finite_number" in kinds:
        kind, message = "finite_number", f"{field}: numbers must be finite (1e400 and up overflow to infinity)"
    elif len(kinds) > 1:
        # a field of several forms: pydantic reports each form's complaint, none of which helps
        forms = FORMS.get(field, "one of the forms in /openapi.json")
        message = f"{field} is {json.dumps(first.get('input'))}: it must be {forms}"
    else:
        message = f"{'.'.join(loc)}: {first['msg']}"
    return await _api_error(request, ApiError(400, message, param=field, code=kind))


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    message = str(e.detail)
    if e.status_code == 400 and message == "There was an error parsing the body":  # FastAPI's, for non-UTF-8 bytes
        message = f"the body could not be read as JSON: {JSON_BODY}"
    return await _api_error(request, ApiError(e.status_code, message, code=code, headers=e.headers))


async def _server_error(request: Request, e: Exception) -> JSONResponse:
    return await _api_error(request, ApiError(500, f"internal error: {e}", type="server_error"))


ERROR_HANDLERS = {ApiError: _api_error, RequestValidationError: _validation_error,
                  StarletteHTTPException: _http_error, Exception: _server_error}


class Gate:
    """ASGI middleware in front of the routes: the API key (all but the open routes), then the body's size, both
    before anything reads the body. The body is read here whole, up to `max_body_bytes` (413 past it)."""

    OPEN = re.compile(r"/|/health|/api/config|/api/jobs/[^/]+/events")  # events check ?api_key= themselves

    def __init__(self, app, api_key: str | None, max_body_bytes: int, routes: Callable[[], list]):
        self.app, self.api_key, self.max_body_bytes, self.routes = app, api_key, max_body_bytes, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            if not self.OPEN.fullmatch(scope["path"]):
                headers = dict(scope["headers"])
                check_key(self.api_key, headers.get(b"authorization", b"").decode("latin-1"))
            if scope["method"] in ("GET", "HEAD"):
                return await self.app(scope, receive, send)
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] != "http.request":  # the client went away
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > self.max_body_bytes:
                    raise ApiError(413, f"the request body is over {self.max_body_bytes} bytes: a generation request "
                                        "is a small JSON object", code="body_too_large")
                if not message.get("more_body", False):
                    break
        except ApiError as e:
            # the route it was meant for, for /metrics (the router, which would set it, never sees the request)
            scope["route"] = next((r for r in self.routes() if hasattr(r, "path") and r.matches(scope)[0] == Match.FULL),
                                  None)
            return await Json(e.body(), status_code=e.status, headers=e.headers)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect the routes poll for
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


class CountRequests:
    """ASGI middleware: count requests by route template and status for /metrics."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            self.metrics.count_request(route.path if route is not None else "unmatched", status)
