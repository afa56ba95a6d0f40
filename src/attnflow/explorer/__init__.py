"""`attnflow serve`: the interactive flow explorer, a local web page over a Starlette server.

`serve()` serves the embedded demo model until Ctrl-C and prints
`http://127.0.0.1:PORT/#token=...`; `serve(model)` takes a model already loaded
(or a directory, or {name: loader}).  Both block, so they are not run as doctests:

    >>> import attnflow as af
    >>> from attnflow.explorer import serve
    >>> serve()                                   # doctest: +SKIP
    >>> serve(af.load("models/SmolLM2-135M"))     # doctest: +SKIP

The page types a prompt (or chat messages) with named documents, streams the
greedy completion, and draws the pruned flow graph of any output token
(`attnflow.explorer.graph`); runs are recorded once (`attnflow.explorer.runs`) and
answered from that record.  The server binds 127.0.0.1, checks Host and Origin,
and wants the session token from the printed URL on every API call
(`attnflow.explorer.app`).
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

from attnflow import _checks
from attnflow.errors import BadArgumentError, ModelNotFoundError

__all__ = ["LOOPBACK", "model_loaders", "serve"]

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def model_loaders(model: Any = None, models_dir: str | os.PathLike | None = None) -> dict[str, Callable[[], Any]]:
    """The start-time allow-list: name -> loader.  None = the demo model; a path, a list of paths,
    a loaded model, or a dict name -> loader; plus every model directory / .gguf file under `models_dir`.

        >>> Path("ckpt").mkdir(); Path("ckpt/smol.gguf").touch()   # (loaders open their model on first call)
        >>> list(model_loaders([af.demo.MODEL_DIR, "ckpt/smol.gguf"]))
        ['model', 'smol']
    """
    from attnflow import demo

    out: dict[str, Callable[[], Any]] = {}
    items = [] if model is None else list(model) if isinstance(model, (list, tuple)) else [model]
    if isinstance(model, dict):
        out.update(model)
        items = []
    for m in items:
        if isinstance(m, (str, os.PathLike)):
            path = Path(m).expanduser()
            if not path.exists():
                raise ModelNotFoundError(f"no model at {str(path)!r}; pass a model directory or a .gguf file")
            out[_unique(out, path.stem if path.is_file() else path.name)] = _path_loader(path)
        else:
            out[_unique(out, "model")] = (lambda m=m: m)
    if models_dir is not None:
        root = _checks.path("models_dir", models_dir).expanduser()
        if not root.is_dir():
            raise ModelNotFoundError(f"--models-dir {str(root)!r} is no directory")
        for p in sorted(root.iterdir()):
            if (p.is_dir() and (p / "config.json").is_file()) or (p.is_file() and p.suffix == ".gguf"):
                out[_unique(out, p.stem if p.is_file() else p.name)] = _path_loader(p)
        if not out:
            raise ModelNotFoundError(f"no model directory (with config.json) or .gguf file under {str(root)!r}")
    if not out:
        out["demo"] = demo.load
    return out


def _unique(taken: dict, name: str) -> str:
    n, i = name, 2
    while n in taken:
        n, i = f"{name}-{i}", i + 1
    return n


def _path_loader(path: Path) -> Callable[[], Any]:
    def load():
        from attnflow.tracers import load as af_load

        return af_load(str(path))  # never trust_remote_code: af.load does not pass it

    return load


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0 = a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise BadArgumentError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port") from None
    sock.listen(64)
    return sock


def serve(
    model: Any = None,
    *,
    models_dir: str | os.PathLike | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    allow_remote: bool = False,
    open_browser: bool = True,
    limits: Any = None,
    token: str | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the explorer until interrupted; prints (and opens) `http://host:port/#token=...`.

    Binding anything but a loopback address needs `allow_remote=True` and warns: the
    token is then the only thing between the network and the models.
    """
    import uvicorn

    from attnflow.explorer.app import create_app
    from attnflow.explorer.runs import Limits

    if not isinstance(host, str) or not host:
        raise BadArgumentError(f"host={host!r}; use an address like 127.0.0.1")
    port = _checks.integer("port", port, 0, 65536)  # 0: a free port
    allow_remote, open_browser = _checks.flag("allow_remote", allow_remote), _checks.flag("open_browser", open_browser)
    if limits is not None:
        _checks.instance("limits", limits, Limits, "an attnflow.explorer.runs.Limits (or None)")
    if token is not None and (not isinstance(token, str) or not token):
        raise BadArgumentError(f"token={token!r}; use a non-empty string (or None: a random one)")
    if host not in LOOPBACK:
        if not allow_remote:
            raise BadArgumentError(f"--host {host} is not a loopback address; add --allow-remote to expose the explorer")
        warnings.warn(f"attnflow serve listens on {host}: anyone who can reach it and learns the token can run the models",
                      stacklevel=2)
    token = token or secrets.token_urlsafe(24)
    allow = LOOPBACK if host in LOOPBACK else (*LOOPBACK, host)
    app = create_app(model_loaders(model, models_dir), token, host_allow=allow, limits=limits or Limits())
    first = next(iter(app.state.runner.models))
    threading.Thread(target=app.state.runner.model, args=(first,), name="attnflow-serve-preload", daemon=True).start()
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}/#token={token}"
    print(f"attnflow serve: {url}", flush=True)
    if on_ready is not None:
        on_ready(url)
    if open_browser:
        import webbrowser

        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")  # no request lines: no prompts
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        print("attnflow serve: stopped", file=sys.stderr)
