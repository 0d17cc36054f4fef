"""The HTTP API: the subset of Lybic's REST API that the ``lybic`` SDK's Sandbox uses.

Paths, bodies and answers are the SDK's own: requests are validated with the
SDK's DTO classes and answers are built from them, so a field the SDK expects
cannot go missing. Every ``/api/`` request needs the ``x-api-key`` header (the
only credential the SDK sends; the organisation is in the path). Errors have
Lybic's JSON shape ``{"code", "message"}``, which the SDK raises as
``LybicAPIError``. Screenshot URLs are unguessable, short-lived capability
URLs, because the SDK fetches them without credentials.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from lybic import dto
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from localsandbox._errors import (
    BadRequestError,
    SandboxError,
    UnsupportedActionError,
)
from localsandbox._sandboxes import PRESET_SHAPES, Sandbox, SandboxManager, Shape

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024 * 1024

_Dto = TypeVar("_Dto", bound=BaseModel)

_COMPUTER_ACTIONS: tuple[Any, ...] = (
    dto.MouseClickAction,
    dto.MouseDoubleClickAction,
    dto.MouseTripleClickAction,
    dto.MouseMoveAction,
    dto.MouseScrollAction,
    dto.MouseDragAction,
    dto.KeyboardTypeAction,
    dto.KeyboardHotkeyAction,
    dto.KeyDownAction,
    dto.KeyUpAction,
    dto.ScreenshotAction,
    dto.WaitAction,
    dto.FinishedAction,
    dto.FailedAction,
    dto.ClientUserTakeoverAction,
)
_ACTION_BY_TYPE: dict[str, Any] = {c.model_fields["type"].default: c for c in _COMPUTER_ACTIONS}
_MOBILE_PREFIXES = ("touch:", "android:", "os:")


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status)


def _json(model: BaseModel | list[Any] | dict[str, Any], status: int = 200) -> JSONResponse:
    if isinstance(model, BaseModel):
        return JSONResponse(model.model_dump(mode="json"), status_code=status)
    return JSONResponse(model, status_code=status)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def _validated(model: type[_Dto], data: Any) -> _Dto:
    """``data`` as the SDK's ``model``; a 400 saying what is wrong otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequestError(_validation_message(exc)) from exc


class ApiKeyMiddleware:
    """Requires ``x-api-key`` on ``/api/``; compares in constant time."""

    def __init__(self, app: ASGIApp, api_key: str, org_id: str | None) -> None:
        self.app = app
        self._key = api_key.encode()
        self._org = org_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith("/api/"):
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"x-api-key":
                given = value
                break
        if not given:
            response: Response = _error(401, "UNAUTHORIZED", "missing x-api-key header")
        elif not hmac.compare_digest(given, self._key):
            response = _error(401, "UNAUTHORIZED", "invalid API key")
        elif self._org is not None and not _org_matches(scope["path"], self._org):
            response = _error(403, "FORBIDDEN", "this API key does not belong to that organization")
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)


def _org_matches(path: str, org: str) -> bool:
    parts = path.split("/")
    # /api/orgs/{org}/...
    return len(parts) < 4 or parts[2] != "orgs" or parts[3] == org


async def _body(request: Request) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        raise BadRequestError(f"request body larger than {MAX_BODY} bytes")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY:
            raise BadRequestError(f"request body larger than {MAX_BODY} bytes")
    if not data:
        return {}
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequestError("request body is not valid JSON") from exc


def parse_action(raw: Any) -> Any:
    """The SDK action DTO for a raw ``action`` object; 400 for anything else."""
    if not isinstance(raw, dict):
        raise BadRequestError("action: must be an object with a 'type'")
    kind = raw.get("type")
    cls = _ACTION_BY_TYPE.get(kind) if isinstance(kind, str) else None
    if cls is None:
        if isinstance(kind, str) and kind.startswith(_MOBILE_PREFIXES):
            raise UnsupportedActionError(f"{kind} is a mobile action; this is a desktop sandbox")
        raise UnsupportedActionError(
            f"unknown action type {str(kind)[:60]!r}; supported: " + ", ".join(_ACTION_BY_TYPE)
        )
    try:
        return cls.model_validate({k: v for k, v in raw.items() if k != "callId"})
    except ValidationError as exc:
        raise BadRequestError(
            _validation_message(exc).replace("invalid request", "action")
        ) from exc


def create_app(manager: SandboxManager, *, api_key: str, org_id: str | None = None) -> ASGIApp:
    """The ASGI application serving ``manager``'s sandboxes."""

    def sandbox_of(request: Request) -> Sandbox:
        return manager.get(request.path_params["org"], request.path_params["sid"])

    def shot_url(request: Request, token: str) -> str:
        return str(request.url_for("screenshot", token=token))

    async def action_response(
        request: Request, sb: Sandbox, *, screenshot: bool, cursor: bool, put_url: str | None
    ) -> JSONResponse:
        out: dict[str, Any] = {}
        if screenshot or put_url:
            token = await manager.screenshot(sb)
            if put_url:
                await manager.upload_screenshot(token, put_url)
            if screenshot:
                out["screenShot"] = shot_url(request, token)
        if cursor:
            c = await manager.cursor(sb)
            out["cursorPosition"] = {
                "x": c.x,
                "y": c.y,
                "screenWidth": c.screen_width,
                "screenHeight": c.screen_height,
                "screenIndex": c.screen_index,
            }
        return _json(dto.SandboxActionResponseDto.model_validate(out))

    async def list_sandboxes(request: Request) -> Response:
        items = [
            sb.dto_fields(with_shape=False) for sb in manager.sandboxes(request.path_params["org"])
        ]
        return _json(dto.SandboxListResponseDto.model_validate(items).model_dump(mode="json"))

    async def create_sandbox(request: Request) -> Response:
        data = _validated(dto.CreateSandboxDto, await _body(request))
        sb = await manager.create(
            request.path_params["org"],
            name=data.name,
            shape=data.shape,
            max_life_seconds=data.maxLifeSeconds,
            project_id=data.projectId,
        )
        return _json(dto.Sandbox.model_validate(sb.dto_fields(with_shape=True)))

    async def get_sandbox(request: Request) -> Response:
        sb = sandbox_of(request)
        body = {
            "sandbox": sb.dto_fields(with_shape=True),
            # No streaming gateway here: the desktop is reached through the API only.
            "connectDetails": {
                "gatewayAddresses": [],
                "certificateHashBase64": "",
                "endUserToken": "",
                "roomId": sb.id,
            },
        }
        return _json(dto.GetSandboxResponseDto.model_validate(body))

    async def delete_sandbox(request: Request) -> Response:
        await manager.delete(request.path_params["org"], request.path_params["sid"])
        return Response(status_code=204)

    async def sandbox_status(request: Request) -> Response:
        return _json({"status": sandbox_of(request).status()})

    async def extend_sandbox(request: Request) -> Response:
        data = _validated(dto.ExtendSandboxDto, await _body(request))
        manager.extend(request.path_params["org"], request.path_params["sid"], data.maxLifeSeconds)
        return Response(status_code=204)

    async def preview(request: Request) -> Response:
        sb = sandbox_of(request)
        return await action_response(request, sb, screenshot=True, cursor=True, put_url=None)

    async def execute_action(request: Request) -> Response:
        sb = sandbox_of(request)
        body = await _body(request)
        if not isinstance(body, dict):
            raise BadRequestError("request body must be a JSON object")
        action = parse_action(body.get("action"))
        rest = {k: v for k, v in body.items() if k != "action"}
        options = _validated(dto.ExecuteSandboxActionDto, {**rest, "action": {}})
        await manager.perform(sb, action)
        return await action_response(
            request,
            sb,
            screenshot=bool(options.includeScreenShot),
            cursor=bool(options.includeCursorPosition),
            put_url=options.screenShotPutUrl,
        )

    async def run_process(request: Request) -> Response:
        sb = sandbox_of(request)
        data = _validated(dto.SandboxProcessRequestDto, await _body(request))
        result = await manager.run_process(
            sb,
            executable=data.executable,
            args=list(data.args),
            working_directory=data.workingDirectory,
            stdin_base64=data.stdinBase64,
        )
        return _json(
            dto.SandboxProcessResponseDto(
                stdoutBase64=base64.b64encode(result.stdout).decode(),
                stderrBase64=base64.b64encode(result.stderr).decode(),
                exitCode=result.exit_code,
            )
        )

    async def copy_files(request: Request) -> Response:
        sb = sandbox_of(request)
        data = _validated(dto.SandboxFileCopyRequestDto, await _body(request))
        results = await manager.copy_files(sb, list(data.files))
        return _json(dto.SandboxFileCopyResponseDto(results=results))

    async def shapes(request: Request) -> Response:
        rows = []
        for name in PRESET_SHAPES:
            fields = Shape.parse(name).dto_fields()
            rows.append(
                {**fields, "pricePerHour": str(fields["pricePerHour"]), "requiredPlanTier": 0}
            )
        return _json(dto.GetShapesResponseDto.model_validate(rows).model_dump(mode="json"))

    async def screenshot(request: Request) -> Response:
        data = manager.screenshot_bytes(request.path_params["token"])
        if data is None:
            return _error(404, "NOT_FOUND", "screenshot expired or unknown")
        return Response(data, media_type="image/webp", headers={"Cache-Control": "no-store"})

    async def health(request: Request) -> Response:
        return _json({"status": "ok"})

    async def sandbox_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SandboxError)
        if exc.status >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, exc)
        return _error(exc.status, exc.api_code, str(exc))

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, "INTERNAL_ERROR", "internal error")

    sbx = "/api/orgs/{org}/sandboxes/{sid}"
    routes = [
        Route("/api/orgs/{org}/sandboxes", list_sandboxes, methods=["GET"]),
        Route("/api/orgs/{org}/sandboxes", create_sandbox, methods=["POST"]),
        Route(sbx, get_sandbox, methods=["GET"]),
        Route(sbx, delete_sandbox, methods=["DELETE"]),
        Route(sbx + "/status", sandbox_status, methods=["GET"]),
        Route(sbx + "/extend", extend_sandbox, methods=["POST"]),
        Route(sbx + "/preview", preview, methods=["POST"]),
        Route(sbx + "/actions/execute", execute_action, methods=["POST"]),
        Route(sbx + "/actions/computer-use", execute_action, methods=["POST"]),
        Route(sbx + "/process", run_process, methods=["POST"]),
        Route(sbx + "/file/copy", copy_files, methods=["POST"]),
        Route("/api/orgs/{org}/shapes", shapes, methods=["GET"]),
        Route("/screenshots/{token}.webp", screenshot, methods=["GET"], name="screenshot"),
        Route("/healthz", health, methods=["GET"]),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        SandboxError: sandbox_error,
        Exception: unexpected,
    }
    app = Starlette(routes=routes, exception_handlers=handlers)
    return ApiKeyMiddleware(app, api_key, org_id)
