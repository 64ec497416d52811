"""ASGI-level pieces of the server: `ApiError` (an error answered with an OpenAI error body, and
the mapping of engine exceptions to HTTP statuses), `Guard` (API key, body-size limit and the
last-resort 500, before any body is read) and `CountStatus` (responses counted by status)."""

from __future__ import annotations

import collections
import json
import logging
import secrets

from fastapi.responses import Response
from starlette.datastructures import Headers

from lmserve.errors import ContextLengthError, InvalidParameterError, LmserveError
from lmserve.server import protocol as proto
from lmserve.server.async_engine import EngineStepError, EngineUnavailableError, RequestTimeoutError
from lmserve.server.metrics import ServerMetrics

logger = logging.getLogger("lmserve.server")


class ApiError(Exception):
    """An error answered with an OpenAI error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> str:
        """The OpenAI error body as ASCII JSON, so that quoting a client's malformed text (a lone
        surrogate) cannot make the error itself fail to encode."""
        return json.dumps(proto.error_body(self.message, self.type, self.param, self.code))

    def response(self) -> Response:
        return Response(self.body(), self.status, headers=self.headers, media_type="application/json")

    @classmethod
    def of(cls, exc: BaseException, prompt_param: str = "prompt") -> ApiError:
        """Map an engine-side exception to its HTTP error."""
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, ContextLengthError):
            param = prompt_param if exc.field == "prompt" else exc.field
            return cls(400, str(exc), param=param, code="context_length_exceeded")
        if isinstance(exc, InvalidParameterError):
            param = prompt_param if exc.field == "prompt" else exc.field
            return cls(400, str(exc), param=param)
        if isinstance(exc, RequestTimeoutError):
            return cls(504, str(exc), "timeout_error", code="timeout")
        if isinstance(exc, EngineUnavailableError):
            return cls(503, str(exc), "service_unavailable_error")
        if isinstance(exc, LmserveError):
            return cls(400, str(exc))
        if isinstance(exc, EngineStepError):
            return cls(500, str(exc), "server_error")
        logger.error("internal error", exc_info=exc)
        return cls(500, f"internal server error ({type(exc).__name__})", "server_error")


class CountStatus:
    """ASGI middleware counting /v1 responses by status code (streaming ones when they start)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.http_requests.labels(str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


class Guard:
    """ASGI middleware in front of the routes, before any body is read: the API key (every route
    but GET /health, the playground's GET / and /static/*, and /metrics unless it is public), the body-size limit (a declared
    Content-Length refused at once, a chunked body counted as it arrives) and, last, any
    unexpected exception: an OpenAI 500 body instead of a re-raise that would close the connection."""

    def __init__(self, app, api_key: str | None, metrics_public: bool, max_body_size: int):
        self.app, self.api_key, self.metrics_public, self.max_body_size = app, api_key, metrics_public, max_body_size

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            headers = Headers(scope=scope)
            self._check_key(scope, headers)
            length = headers.get("content-length")
            if length is None:
                receive = await self._read_body(receive)
            elif int(length) > self.max_body_size:
                raise self._too_large()
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:  # too late for an error status; uvicorn closes an unfinished response
                logger.error("error after the response started", exc_info=exc)
                return
            await ApiError.of(exc).response()(scope, receive, send)

    def _check_key(self, scope, headers: Headers) -> None:
        path = scope["path"]
        if (self.api_key is None or (path == "/health" and scope["method"] == "GET")
                or (path == "/metrics" and self.metrics_public)
                or (scope["method"] in ("GET", "HEAD") and (path == "/" or path.startswith("/static/")))):
            # the playground page and its files hold no data: the page asks for the key itself
            return
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body exceeds the limit of {self.max_body_size} bytes",
                        code="request_too_large")

    async def _read_body(self, receive):
        """Read a body of undeclared length up to the limit; a `receive` that replays it first."""
        messages, size = collections.deque(), 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_body_size:
                raise self._too_large()
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.popleft() if messages else await receive()
        return replay
