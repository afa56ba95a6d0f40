"""The explorer's HTTP side: a Starlette app with a guard in front of every request.

    >>> app = create_app({"demo": attnflow.demo.load}, token=secrets.token_urlsafe(24))
    >>> uvicorn.run(app, host="127.0.0.1", port=8765)            # what `attnflow serve` does

Routes (every /api/ call needs the header `X-Attnflow-Token: <token>`):

    GET  /  /explorer.js  /explorer.css          the page, by fixed name (nothing else is served)
    GET  /api/models                             the allow-list given at start
    POST /api/runs                               {model, prompt | messages, documents: [{name, text}], max_new_tokens}
    GET  /api/runs/{id}/events                   server-sent events: queued, progress, token, recorded, done | error
    GET  /api/runs/{id}                          the run's tokens and spans once recorded
    GET  /api/runs/{id}/graph?target=&tau=&top_k=&alpha=&sinks=&bottom=
    GET  /api/runs/{id}/heads?layer=&rows=       per-head rows, in the offline viewer's shard encoding
    GET  /api/runs/{id}/attribution?target=&alpha=&sinks=
    GET  /api/runs/{id}/export                   zip: offline viewer + Parquet

The guard answers 400 to a Host outside `host_allow` (DNS rebinding), 403 to an
Origin other than the page's own or a cross-site fetch, 403 without the token
(compared with hmac.compare_digest), 413 to a body over `Limits.max_body`; it
sends no CORS headers and puts a strict CSP on every response.  Prompts are
never logged.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
from importlib import resources
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from attnflow.errors import AttnflowError, BadArgumentError
from attnflow.explorer.runs import Limits, QueueFull, RunGone, Runner

__all__ = ["CSP", "create_app"]

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
TOKEN_HEADER = "x-attnflow-token"
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/explorer.js": ("explorer.js", "text/javascript; charset=utf-8"),
          "/explorer.css": ("explorer.css", "text/css; charset=utf-8")}
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


class BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: Host, Origin, token and body-size checks, security headers on every response."""

    def __init__(self, app, token: str, host_allow: tuple[str, ...], max_body: int):
        self.app, self.token, self.max_body = app, token.encode(), max_body
        self.host_allow = {h.lower() for h in host_allow}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}

        async def secured_send(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        refusal = self.refuse(scope, headers)
        if refusal is not None:
            return await refusal(scope, receive, secured_send)
        seen = 0

        async def capped_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge
            return message

        try:
            await self.app(scope, capped_receive, secured_send)
        except BodyTooLarge:
            await _too_large(self.max_body)(scope, receive, secured_send)

    def refuse(self, scope, headers: dict[str, str]) -> Response | None:
        host = headers.get("host", "")
        if _hostname(host) not in self.host_allow:
            return PlainTextResponse("bad Host header", status_code=400)
        origin = headers.get("origin")
        if origin is not None and origin.lower() not in (f"http://{host}".lower(), f"https://{host}".lower()):
            return PlainTextResponse("cross-origin requests are refused", status_code=403)
        if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return PlainTextResponse("cross-site requests are refused", status_code=403)
        if scope["path"].startswith("/api/"):
            given = headers.get(TOKEN_HEADER, "").encode("latin-1")
            if not hmac.compare_digest(given, self.token):
                return JSONResponse({"error": "missing or wrong session token; open the URL attnflow serve printed"},
                                    status_code=403)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return _too_large(self.max_body)
        return None


def _too_large(limit: int) -> Response:
    return JSONResponse({"error": f"request body over {limit} bytes; send less (shorter documents)"}, status_code=413)


def _hostname(host: str) -> str:
    """`127.0.0.1:8765` -> `127.0.0.1`, `[::1]:80` -> `[::1]`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def load_anyio() -> None:
    """Import the parts of anyio that Starlette and uvicorn load lazily, whether or not nnsight came first.

    nnsight 0.8 gives every object a `save` method; anyio's typed-attribute classes
    (`TypedAttributeSet` subclasses, defined on first use) refuse any public name
    without an annotation, so importing them after nnsight raises TypeError.  The
    base class is told about `save` for the duration of the imports only.
    """
    from anyio._core import _typedattr

    base = _typedattr.TypedAttributeSet
    own = base.__dict__.get("__annotations__")
    if hasattr(object, "save"):
        base.__annotations__ = {**(own or {}), "save": Any}
    try:
        import anyio._backends._asyncio  # noqa: F401  (run_in_threadpool, TestClient)
        import anyio.abc  # noqa: F401
        import anyio.streams.stapled  # noqa: F401
        import anyio.streams.tls  # noqa: F401
    finally:
        if own is None:
            base.__annotations__ = {}
        else:
            base.__annotations__ = own


# --- request helpers ----------------------------------------------------------------------
def _int(q, name: str, default: int | None = None) -> int | None:
    v = q.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise BadArgumentError(f"{name}={v[:40]!r}; give an integer") from None


def _float(q, name: str, default: float | None = None) -> float | None:
    v = q.get(name)
    if v is None or v == "":
        return default
    try:
        x = float(v)
    except ValueError:
        raise BadArgumentError(f"{name}={v[:40]!r}; give a number") from None
    if x != x or x in (float("inf"), float("-inf")):
        raise BadArgumentError(f"{name}={v[:40]!r}; give a finite number")
    return x


def _flag(q, name: str, default: bool) -> bool:
    v = q.get(name)
    return default if v is None else v not in ("0", "false", "off", "")


def _error(status: int, err: Exception) -> JSONResponse:
    return JSONResponse({"error": str(err).splitlines()[0] if str(err) else type(err).__name__}, status_code=status)


def _api(fn: Callable) -> Callable:
    """Map attnflow errors to 400 / 404 / 429 JSON answers."""

    async def endpoint(request: Request) -> Response:
        try:
            return await fn(request)
        except QueueFull as err:
            return _error(429, err)
        except RunGone as err:
            return _error(404, err)
        except AttnflowError as err:
            return _error(400, err)

    return endpoint


# --- the app ------------------------------------------------------------------------------
def create_app(
    models: dict[str, Callable[[], Any]],
    token: str,
    *,
    host_allow: tuple[str, ...] = ("127.0.0.1", "localhost"),
    limits: Limits = Limits(),
) -> Starlette:
    """The explorer for the allow-listed `models` (name -> loader called once, on first use).

    `app.state.runner` is the Runner (queue, cache); `token` guards every /api/ call.
    """
    if not isinstance(token, str) or len(token) < 16:
        raise BadArgumentError("the session token must be a string of at least 16 characters")
    load_anyio()
    runner = Runner(models, limits)
    static = {path: (resources.files("attnflow.explorer").joinpath("static", name).read_bytes(), kind)
              for path, (name, kind) in STATIC.items()}

    async def page(request: Request) -> Response:
        body, kind = static[request.url.path]
        return Response(body, media_type=kind)

    async def list_models(request: Request) -> Response:
        return JSONResponse({"models": list(runner.models), "limits": {
            "max_tokens": limits.max_tokens, "max_new_tokens": limits.max_new_tokens}})

    async def create_run(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise BadArgumentError("the request body is no JSON; send {model, prompt, documents, max_new_tokens}") from None
        prepared = await run_in_threadpool(runner.prepare, body)
        run = runner.submit(prepared)
        return JSONResponse({"id": run.id, "prompt_tokens": len(prepared.ids)}, status_code=202)

    async def events(request: Request) -> Response:
        run = runner.get(request.path_params["run"])

        async def stream():
            i = 0
            while True:
                while i < len(run.events):
                    ev = run.events[i]
                    data = {k: v for k, v in ev.items() if k != "event"}
                    yield f"id: {i}\nevent: {ev['event']}\ndata: {json.dumps(data)}\n\n"
                    i += 1
                if run.finished.is_set() and i >= len(run.events):
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.02)

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def run_info(request: Request) -> Response:
        run = runner.get(request.path_params["run"])
        if run.record is None:
            return JSONResponse({"id": run.id, "state": run.state, "error": run.error})
        return JSONResponse(runner.summary(run))

    async def graph(request: Request) -> Response:
        run, q = runner.get(request.path_params["run"]), request.query_params
        top_k = _int(q, "top_k")
        kw = dict(target=_int(q, "target"), tau=_float(q, "tau", 0.01), top_k=top_k, alpha=_float(q, "alpha", 0.5),
                  exclude_keys=(0,) if _flag(q, "sinks", True) else ())
        g = await run_in_threadpool(lambda: runner.graph(run, **kw))
        if not _flag(q, "bottom", False):
            del g["bottom"]
        return JSONResponse(g)

    async def heads(request: Request) -> Response:
        from attnflow.exporters.html import encode

        run, q = runner.get(request.path_params["run"]), request.query_params
        layer = _int(q, "layer")
        try:
            rows = [int(r) for r in q.get("rows", "").split(",") if r.strip()]
        except ValueError:
            raise BadArgumentError("rows must be comma-separated integers") from None
        P = await run_in_threadpool(runner.heads, run, layer, rows)  # [head, row, key]
        import torch

        widths = torch.tensor(rows) + 1  # causal rows: keys 0..row, as in the viewer's shards
        values, scales = encode(P, widths, "uint8")
        return JSONResponse({"layer": layer, "rows": rows, "num_heads": int(P.shape[0]), "enc": "uint8",
                             "data": base64.b64encode(values).decode(), "scales": base64.b64encode(scales).decode()})

    async def attribution(request: Request) -> Response:
        run, q = runner.get(request.path_params["run"]), request.query_params
        kw = dict(target=_int(q, "target"), alpha=_float(q, "alpha", 0.5), sinks=_flag(q, "sinks", True))
        return JSONResponse(await run_in_threadpool(lambda: runner.attribution(run, **kw)))

    async def export(request: Request) -> Response:
        run = runner.get(request.path_params["run"])
        data = await run_in_threadpool(runner.export, run)
        return Response(data, media_type="application/zip",
                        headers={"content-disposition": f'attachment; filename="attnflow-run-{run.id}.zip"'})

    async def not_found(request: Request, exc) -> Response:
        return PlainTextResponse("not found", status_code=404)

    async def no_icon(request: Request) -> Response:
        return Response(status_code=204)  # browsers ask for one; answering 404 shows as a console error

    routes = [Route(path, page) for path in STATIC] + [Route("/favicon.ico", no_icon)] + [
        Route("/api/models", _api(list_models)),
        Route("/api/runs", _api(create_run), methods=["POST"]),
        Route("/api/runs/{run:str}", _api(run_info)),
        Route("/api/runs/{run:str}/events", _api(events)),
        Route("/api/runs/{run:str}/graph", _api(graph)),
        Route("/api/runs/{run:str}/heads", _api(heads)),
        Route("/api/runs/{run:str}/attribution", _api(attribution)),
        Route("/api/runs/{run:str}/export", _api(export)),
    ]
    guard = Middleware(Guard, token=token, host_allow=tuple(host_allow), max_body=limits.max_body)
    app = Starlette(routes=routes, middleware=[guard], exception_handlers={404: not_found, 405: not_found})
    app.state.runner = runner
    return app
