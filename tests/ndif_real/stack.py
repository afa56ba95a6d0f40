"""Start and stop the real NDIF server (ndif 0.1.2) on 127.0.0.1, every process by PID.

    >>> with Stack(work_dir) as ndif:                      # Redis, S3 (moto), Ray head + controller, API
    ...     ndif.deploy(model_key, size_bytes=4 << 20)     # a replica of a model in the offline HF cache
    ...     ndif.url                                       # "http://127.0.0.1:<port>", for nnsight's CONFIG.API.HOST

The pieces, each a child process in its own session, logged to `work_dir/logs/`:

    redis-server        Debian's; its pubsub limits set NDIF's inline-result cap (`inline_cap`)
    moto_server         the S3 API in place of NDIF's rustfs, for results above that cap
    ray start --block   a head node that declares one GPU and its memory, since NDIF's
                        controller only places models on GPU nodes; the controller actor
                        and every model actor run under it
    controller          `python -m ndif.services.ray.deployments.controller.controller`
    gunicorn            NDIF's API (FastAPI) with its queue dispatcher, bound to 127.0.0.1

No Postgres, so the API has no auth.  Models deploy as `cpu_actor.CPUSandboxModelActor`,
NDIF's sandboxed actor with CUDA loading and cleanup replaced.  Deploys are made by hand
with an explicit model key and size: with nnsight 0.8.1 NDIF cannot size a model
(`describe_checkpoint() got an unexpected keyword argument 'trust_remote_code'`).

`stop()` ends each process group it started, then every process that still carries
this run's marker variable (Ray's workers inherit it), so nothing is left running.

    python tests/ndif_real/stack.py        # start, print the URL, wait for Ctrl-C, stop
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = Path(os.environ.get("NDIF_REAL_VENV", "/work/ndif-venv"))
MARKER = "ATTNFLOW_NDIF_REAL_RUN"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float, logs: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.5)
    tail = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(logs.glob("*"))) if logs else ""
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s{tail}")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status == 200


def put_in_hf_cache(hf_home: Path, repo_id: str, model_dir: Path) -> None:
    """Lay `model_dir`'s files out as the hub cache does (blobs, snapshot links, refs/main)."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in Path(model_dir).iterdir() if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / f.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


class Stack:
    def __init__(self, work_dir: str | os.PathLike, inline_cap: int = 1 << 20, start_timeout: float = 300.0,
                 hf_home: str | os.PathLike | None = None):
        self.work = Path(work_dir)
        self.logs = self.work / "logs"
        self.hf_home = Path(hf_home) if hf_home else self.work / "hf"  # the server's offline HF cache
        self.inline_cap = inline_cap  # Redis pubsub soft limit; NDIF inlines results up to it
        self.start_timeout = start_timeout
        self.run_id = uuid.uuid4().hex
        self.ray_tmp = Path("/tmp") / f"ndif-ray-{self.run_id[:8]}"  # short: Ray's unix socket paths max 107 bytes
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.last_killed: list[str] = []
        p = {name: free_port() for name in ("redis", "s3", "ray", "client", "dashboard", "api", "objmgr", "nodemgr")}
        self.ports = p
        self.url = f"http://127.0.0.1:{p['api']}"
        self.ray_url = f"ray://127.0.0.1:{p['client']}"

    # --- environment ---------------------------------------------------------------------
    def env(self) -> dict:
        path = f"{VENV / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NDIF_", "VIRTUAL_ENV", "PYTHON", "RAY_"))}
        env.update({
            MARKER: self.run_id, "PATH": path, "PYTHONPATH": str(HERE), "PYTHONNOUSERSITE": "1",
            "HF_HOME": str(self.hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # else Ray swaps 127.0.0.1 for the machine's address
            "GRPC_ENABLE_FORK_SUPPORT": "0", "NDIF_ENVIRONMENT": "test", "NDIF_INFLUX_ENABLED": "0",
            "NDIF_REDIS_URL": f"redis://127.0.0.1:{self.ports['redis']}",
            "NDIF_OBJECT_STORE_URL": f"http://127.0.0.1:{self.ports['s3']}",
            "NDIF_OBJECT_STORE_ACCESS_KEY": "testing", "NDIF_OBJECT_STORE_SECRET_KEY": "testing",
            "NDIF_RAY_ADDRESS": self.ray_url,
            "NDIF_MODEL_IMPORT_PATH": "cpu_actor.CPUSandboxModelActor",
            "NDIF_DEFAULT_DTYPE": "float32", "NDIF_SANDBOX_POOL_SIZE": "1", "NDIF_DEPLOYMENTS": "",
            "NDIF_CONTROLLER_SYNC_INTERVAL_S": "5", "NDIF_API_WORKERS": "1",
        })
        return env

    def spawn(self, name: str, cmd: list[str], **kw) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=self.work,
                                start_new_session=True, **kw)
        self.procs.append((name, proc))
        return proc

    def python(self, *args: str, timeout: float = 300.0) -> str:
        """Run the NDIF venv's python to completion; its stdout, or RuntimeError with its output."""
        r = subprocess.run([str(VENV / "bin" / "python"), *args], env=self.env(), cwd=self.work, timeout=timeout,
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{args[0]} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
        return r.stdout

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> "Stack":
        if not (VENV / "bin" / "gunicorn").exists() or not shutil.which("redis-server"):
            raise RuntimeError(f"no NDIF venv at {VENV} or no redis-server: run tests/ndif_real/setup.sh")
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.hf_home / "hub").mkdir(parents=True, exist_ok=True)
        p, t = self.ports, self.start_timeout
        self.spawn("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(p["redis"]), "--save", "",
                             "--appendonly", "no", "--protected-mode", "yes",
                             "--client-output-buffer-limit", f"pubsub {4 * self.inline_cap} {self.inline_cap} 60"])
        self.spawn("s3", [str(VENV / "bin" / "moto_server"), "-H", "127.0.0.1", "-p", str(p["s3"])])
        self.spawn("ray", [str(VENV / "bin" / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                           f"--port={p['ray']}", f"--ray-client-server-port={p['client']}",
                           f"--object-manager-port={p['objmgr']}", f"--node-manager-port={p['nodemgr']}",
                           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={p['dashboard']}",
                           "--num-cpus=4", "--num-gpus=1", "--disable-usage-stats",
                           "--resources=" + json.dumps({"head": 10, "cuda_memory_bytes": 8 << 30,
                                                        "cpu_memory_bytes": 8 << 30}),
                           f"--temp-dir={self.ray_tmp}"])
        wait_for("redis", lambda: socket.create_connection(("127.0.0.1", p["redis"]), 1).close() or True, t, self.logs)
        wait_for("moto", lambda: http_ok(f"http://127.0.0.1:{p['s3']}/moto-api/"), t, self.logs)
        wait_for("ray client server", lambda: socket.create_connection(("127.0.0.1", p["client"]), 1).close() or True,
                 t, self.logs)
        env = {"RAY_ADDRESS": f"127.0.0.1:{p['ray']}"}
        ctl = subprocess.Popen([str(VENV / "bin" / "python"), "-m", "ndif.services.ray.deployments.controller.controller"],
                               env={**self.env(), **env}, cwd=self.work, start_new_session=True,
                               stdout=open(self.logs / "controller.log", "ab"), stderr=subprocess.STDOUT)
        self.procs.append(("controller", ctl))
        if ctl.wait(timeout=t):
            raise RuntimeError(f"the NDIF controller did not launch: {(self.logs / 'controller.log').read_text()[-3000:]}")
        self.spawn("api", [str(VENV / "bin" / "gunicorn"), "--config", "python:ndif.services.api.gunicorn_conf",
                           "--bind", f"127.0.0.1:{p['api']}", "ndif.services.api.app:app"])
        wait_for("NDIF API /connected", lambda: http_ok(f"{self.url}/connected"), t, self.logs)
        return self

    def deploy(self, model_key: str, size_bytes: int, timeout: float = 300.0) -> None:
        """Place one replica of `model_key` (float32, pinned) and wait until its actor runs."""
        out = self.python(str(HERE / "deploy.py"), self.ray_url, model_key, str(size_bytes), str(timeout),
                          timeout=timeout + 60)
        print(out.strip().splitlines()[-1] if out.strip() else "", flush=True)

    def stop(self) -> list[str]:
        """End every process this stack started; the names of any that needed SIGKILL."""
        killed = []
        tree = self.ours()  # before the parents go: orphans are re-parented and lose the trail
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
                    killed.append(name)
        time.sleep(1)
        for pid in sorted(set(self.ours()) | set(p for p in tree if _alive(p))):  # left the process groups
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(f"pid {pid}")
            except ProcessLookupError:
                pass
        self.procs.clear()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        self.last_killed = killed
        return killed

    def marked(self) -> list[int]:
        """PIDs of live processes that carry this run's marker (all of them were started here)."""
        needle = f"{MARKER}={self.run_id}".encode()
        pids = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    if needle in (d / "environ").read_bytes().split(b"\0"):
                        pids.append(int(d.name))
                except OSError:
                    pass
        return pids

    def ours(self) -> list[int]:
        """PIDs of every live process this stack started: marked ones and all their descendants.

        NDIF's sandbox runners get a clean environment, so they are found through their parents.
        """
        parents = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    pass
        found = set(self.marked()) | {proc.pid for _, proc in self.procs if proc.poll() is None}
        grew = True
        while grew:
            new = {pid for pid, ppid in parents.items() if ppid in found and pid not in found}
            found |= new
            grew = bool(new)
        found.discard(os.getpid())
        return sorted(found)

    def __enter__(self) -> "Stack":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ndif-real-") as tmp, Stack(tmp) as stack:
        print(f"NDIF at {stack.url} (logs in {stack.logs}); Ctrl-C stops it", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    sys.exit(0)
