"""A loopback stand-in for NDIF's request endpoint, run as a subprocess where `import attnflow` fails.

It speaks the protocol of nnsight 0.8.1's RemoteBackend and answers in the
shapes of the real server, ndif 0.1.2 (`services/api/app.py`, `auth.py`,
`versioning.py`, `ray/deployments/modeling/base.py`, `controller.py`):

    GET  /subscribe        websocket: {"session_id": ...}, then status updates of the session's jobs
    POST /request          multipart: data = RequestModel JSON (model_key, session_id, compress, env),
                           blob = the serialized trace; headers ndif-api-key, nnsight-version, python-version
    GET  /status           {"deployments": {"<replica>:ModelActor:<model_key>": {... "repo_id", "model_key",
                           "deployment_level": "HOT"}, "<repo id>": {"deployment_level": "COLD", "repo_id"}}}
    GET  /env              the server's python and package versions
    GET  /objects/<name>   a result too large to go inline (what the object store's presigned GET serves)
    GET  /stats            sizes of every request and result blob, and the forwards each ran, for the tests
    POST /admin            {"nnsight_version", "min_nnsight_version"}: what /env reports and /request requires

Auth exists only when `--api-key` is given (NDIF: only when Postgres is
configured): then no key is 401, a key that is not a UUID 400, an unknown UUID
403.  The version gate answers 400 "Client nnsight version X is below the
minimum supported Y".  A model that is not deployed is accepted and then fails
on the websocket, as NDIF's processor fails to provision it.

A job is `RequestModel.deserialize(blob, model._remoteable_persistent_objects())`,
`tracer.execute(tracer.info.code)` inside a trace scope, the values the block
`nnsight.save()`d collected from its frame, `torch.save`d and zstd-compressed
when the request was.  A result up to `--inline-cap` bytes (NDIF: derived from
Redis's pubsub limits, 8 MiB on a stock Redis) goes back inline on the
websocket; a larger one is stored and COMPLETED carries a URL to GET it.
attnflow is blocked before anything is imported, so a request that needs
attnflow on the server fails here exactly as on NDIF.

    python tests/ndif_mock/server.py --model DIR --repo-id org/name [--api-key UUID]
                                     [--nnsight-version V] [--min-nnsight-version V]
                                     [--no-repo-id] [--cold org/other ...] [--inline-cap BYTES]
    -> prints "PORT <n>" once it listens on 127.0.0.1
"""

from __future__ import annotations

import importlib.abc
import sys


class _NoAttnflow(importlib.abc.MetaPathFinder):
    """What a server without attnflow installed does on `import attnflow`."""

    def find_spec(self, name, path=None, target=None):
        if name == "attnflow" or name.startswith("attnflow."):
            raise ModuleNotFoundError(f"No module named {name!r} (attnflow is not installed on this server)", name=name)
        return None


sys.meta_path.insert(0, _NoAttnflow())

import argparse  # noqa: E402
import base64  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import queue  # noqa: E402
import struct  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
import uuid  # noqa: E402
from email.parser import BytesParser  # noqa: E402
from email.policy import HTTP  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

import nnsight  # noqa: E402
import torch  # noqa: E402
import zstandard  # noqa: E402
from nnsight.schema.request import RequestModel  # noqa: E402
from nnsight.schema.response import ResponseModel, Status  # noqa: E402
from nnsight.tracing.tracer import _saves, dec, inc  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class State:
    """The served model, its identity, the settings under test, and what was sent and returned."""

    def __init__(self, args):
        hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        hf.requires_grad_(False)
        self.hf = hf
        self.model = nnsight.TransformersModel(hf, tokenizer=AutoTokenizer.from_pretrained(args.model))
        self.repo_id = args.repo_id
        self.model_key = "nnsight.modeling.transformers.TransformersModel:" + json.dumps(
            {"repo_id": args.repo_id, "revision": None, "task": "text-generation"})
        self.report_repo_id = not args.no_repo_id
        self.cold = list(args.cold)
        self.inline_cap = args.inline_cap
        self.objects: dict[str, bytes] = {}
        self.port = 0
        self.api_key = args.api_key
        self.nnsight_version = args.nnsight_version or nnsight.__version__
        self.min_nnsight_version = args.min_nnsight_version
        self.sessions: dict[str, queue.Queue] = {}
        self.jobs: queue.Queue = queue.Queue()
        self.stats: list[dict] = []
        self.lock = threading.Lock()


# --- websocket (RFC 6455), server side: unmasked frames out, masked frames in ---------------
def ws_frame(payload: bytes, opcode: int) -> bytes:
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


def ws_read(rfile) -> tuple[int, bytes]:
    head = rfile.read(2)
    if len(head) < 2:  # the client went away without a close frame
        return 0x8, b""
    b0, b1 = head
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", rfile.read(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", rfile.read(8))
    mask = rfile.read(4) if b1 & 0x80 else b"\0\0\0\0"
    data = bytes(c ^ mask[i % 4] for i, c in enumerate(rfile.read(n)))
    return b0 & 0x0F, data


# --- HTTP ---------------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    state: State
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep the test output clean
        pass

    def _json(self, code: int, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        s = self.state
        if self.path == "/subscribe" and self.headers.get("Upgrade", "").lower() == "websocket":
            return self._subscribe()
        if self.path == "/status":
            return self._json(200, status(s))
        if self.path.startswith("/objects/"):
            with s.lock:
                data = s.objects.pop(self.path.removeprefix("/objects/"), None)
            if data is None:
                return self._json(404, {"detail": "NoSuchKey"})
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return None
        if self.path == "/env":
            return self._json(200, {"python_version": sys.version,
                                    "packages": {"nnsight": s.nnsight_version, "torch": torch.__version__}})
        if self.path == "/stats":
            with s.lock:
                return self._json(200, list(s.stats))
        self._json(404, {"detail": f"no route {self.path}"})

    def _subscribe(self):
        accept = base64.b64encode(hashlib.sha1((self.headers["Sec-WebSocket-Key"] + WS_GUID).encode()).digest())
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept.decode())
        self.end_headers()
        self.close_connection = True
        session = str(uuid.uuid4())
        updates = self.state.sessions.setdefault(session, queue.Queue())
        self.wfile.write(ws_frame(json.dumps({"session_id": session}).encode(), 0x1))

        def read_until_close():  # the client closes after its result, or at once when its POST failed
            while True:
                opcode, data = ws_read(self.rfile)
                if opcode == 0x8:
                    updates.put((data[:2], 0x8, True))
                    return

        threading.Thread(target=read_until_close, daemon=True).start()
        while True:  # stream the job's updates; answer the close frame so close() does not wait out a timeout
            message, opcode, final = updates.get()
            self.wfile.write(ws_frame(message, opcode))
            self.wfile.flush()
            if opcode == 0x8:
                break
        self.state.sessions.pop(session, None)

    def do_POST(self):
        s = self.state
        if self.path == "/admin":  # tests switch the server's reported and required versions
            settings = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            s.nnsight_version = settings.get("nnsight_version") or nnsight.__version__
            s.min_nnsight_version = settings.get("min_nnsight_version")
            return self._json(200, {"ok": True})
        if self.path != "/request":
            return self._json(404, {"detail": f"no route {self.path}"})
        body = self.rfile.read(int(self.headers["Content-Length"]))
        refused = auth_error(s.api_key, self.headers.get("ndif-api-key", "")) or version_error(
            s.min_nnsight_version, self.headers.get("nnsight-version", ""))
        if refused:
            return self._json(*refused)
        form = _multipart(self.headers["Content-Type"], body)
        meta, blob = json.loads(form["data"]), form["blob"]
        job = uuid.uuid4().hex
        s.jobs.put((job, meta, blob))
        self._json(200, ResponseModel(id=job, status=Status.RECEIVED, description="received").model_dump(mode="json"))


def status(s: State) -> dict:
    """/status as NDIF's controller builds it: running replicas by actor name, cached repos as COLD."""
    replica = "0"
    deployments = {f"{replica}:ModelActor:{s.model_key}": {
        "application_state": "RUNNING", "deployment_level": "HOT", "model_key": s.model_key, "replica_id": replica,
        "repo_id": s.repo_id if s.report_repo_id else None, "task": "text-generation", "revision": None}}
    for repo in s.cold:
        deployments[repo] = {"deployment_level": "COLD", "repo_id": repo}
    return {"deployments": deployments, "cluster": {"nodes": {}}}


def auth_error(required: str | None, sent: str) -> tuple[int, dict] | None:
    """NDIF's verify_api_key: nothing without auth; else 401 no key, 400 not a UUID, 403 unknown."""
    if required is None:
        return None
    if not sent:
        return 401, {"detail": "Missing or invalid API key. Please visit https://login.ndif.us/ to create a new one."}
    try:
        uuid.UUID(sent)
    except ValueError:
        return 400, {"detail": f"Invalid API key format: '{sent}'. API keys must be in the format: "
                               "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx. You can obtain a valid API key from https://login.ndif.us"}
    return None if sent == required else (403, {"detail": "Invalid API key."})


def version_error(minimum: str | None, client: str) -> tuple[int, dict] | None:
    """NDIF's validate_client_versions for nnsight (NDIF_MIN_NNSIGHT_VERSION)."""
    if not minimum:
        return None
    if not client:
        return 400, {"detail": "Client nnsight version was not provided. This usually means an outdated nnsight; "
                               "please `pip install --upgrade nnsight` and retry."}
    if _version(client) < _version(minimum):
        return 400, {"detail": f"Client nnsight version {client} is below the minimum supported {minimum}. "
                               "Please `pip install --upgrade nnsight`."}
    return None


def _repo_of(model_key: str) -> str | None:
    try:
        return json.loads(model_key.split(":", 1)[1]).get("repo_id")
    except (IndexError, ValueError, AttributeError):
        return None


def _version(v: str) -> tuple:
    return tuple(int(p) for p in v.split(".")[:3] if p.isdigit()) if v else ()


def _multipart(content_type: str, body: bytes) -> dict[str, bytes]:
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True) for part in msg.iter_parts()}


# --- the worker: runs jobs one at a time against the served model ------------------------------
def execute(state: State, meta: dict, blob: bytes) -> tuple[bytes, list[int]]:
    """Run one request as NDIF's model actor does: the torch.save bytes of the saved values, and the token
    positions of each model forward it ran."""
    state.model._remoteable_set_env(meta.get("env") or {})
    tracer = RequestModel.deserialize(blob, state.model._remoteable_persistent_objects(), compress=meta["compress"])
    forwards = []
    hook = state.hf.register_forward_pre_hook(
        lambda m, a, kw: forwards.append((kw.get("input_ids") if a == () else a[0]).shape[-1]), with_kwargs=True
    )
    inc()
    try:
        tracer.execute(tracer.info.code)
        saves = _saves()
        saved = {name: value for name, value in tracer.info.frame.f_locals.items() if id(value) in saves}
    finally:
        dec()
        hook.remove()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    data = buffer.getvalue()
    return (zstandard.ZstdCompressor(level=3).compress(data) if meta["compress"] else data), forwards


def worker(state: State) -> None:
    while True:
        job, meta, blob = state.jobs.get()
        updates = state.sessions.get(meta.get("session_id", ""))

        def send(response: ResponseModel, final: bool, binary: bool = False) -> None:
            if updates is not None:
                message = response.pickle() if binary else response.model_dump_json().encode()
                updates.put((message, 0x2 if binary else 0x1, final))

        if _repo_of(meta.get("model_key", "")) != state.repo_id:  # NDIF accepts it, then fails to provision it
            send(ResponseModel(id=job, status=Status.ERROR, description="Error provisioning model. "
                               "Please try again later. Sorry for the inconvenience."), True)
            continue
        send(ResponseModel(id=job, status=Status.RUNNING, description="Your job has started running."), False)
        try:
            result, forwards = execute(state, meta, blob)
        except Exception:
            send(ResponseModel(id=job, status=Status.ERROR, description=traceback.format_exc()), True)
            continue
        inline = len(result) <= state.inline_cap
        with state.lock:
            state.stats.append({"job": job, "request_bytes": len(blob), "result_bytes": len(result), "inline": inline,
                                "compressed": bool(meta["compress"]), "attnflow_imported": "attnflow" in sys.modules,
                                "forwards": len(forwards), "tokens": sum(forwards)})
            if not inline:
                state.objects[f"{job}.pt"] = result
        done = "Your job has been completed."
        if inline:
            send(ResponseModel(id=job, status=Status.COMPLETED, description=done, data=result), True, binary=True)
        else:
            url = f"http://127.0.0.1:{state.port}/objects/{job}.pt"
            send(ResponseModel(id=job, status=Status.COMPLETED, description=done, data=url), True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="directory of the served HF model")
    p.add_argument("--repo-id", required=True, help="the hub id this server claims to host")
    p.add_argument("--api-key", default=None, help="require this ndif-api-key header")
    p.add_argument("--nnsight-version", default=None, help="the nnsight version /env reports")
    p.add_argument("--min-nnsight-version", default=None, help="reject older clients with 400, as NDIF does")
    p.add_argument("--no-repo-id", action="store_true", help="report repo_id None, as NDIF does for a config without one")
    p.add_argument("--cold", action="append", default=[], help="a repo id in the server's HF cache, not deployed")
    p.add_argument("--inline-cap", type=int, default=8 << 20, help="larger results go through /objects/ (8 MiB)")
    args = p.parse_args()
    state = State(args)
    Handler.state = state
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    server.daemon_threads = True
    threading.Thread(target=worker, args=(state,), daemon=True).start()
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
