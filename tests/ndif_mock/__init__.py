"""Start and stop the loopback NDIF mock (`server.py`) from tests and benchmarks.

    >>> with serve("tiny/dir", repo_id="attnflow-test/tiny") as mock:
    ...     mock.url                # "http://127.0.0.1:<port>", for nnsight's CONFIG.API.HOST
    ...     mock.stats()            # [{"request_bytes": ..., "result_bytes": ..., "inline": True, ...}, ...]
    ...     mock.configure(nnsight_version="0.7.0")   # pretend the server runs another nnsight
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

SERVER = Path(__file__).with_name("server.py")


@dataclass
class Mock:
    url: str
    process: subprocess.Popen

    def stats(self) -> list[dict]:
        """One entry per completed job: request_bytes, result_bytes, inline, compressed, attnflow_imported."""
        with urllib.request.urlopen(f"{self.url}/stats", timeout=30) as response:
            return json.loads(response.read())

    def configure(self, nnsight_version: str | None = None, min_nnsight_version: str | None = None) -> None:
        """Set the nnsight version /env reports and the minimum /request accepts (None: this one, no minimum)."""
        body = json.dumps({"nnsight_version": nnsight_version, "min_nnsight_version": min_nnsight_version}).encode()
        request = urllib.request.Request(f"{self.url}/admin", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=30):
            pass


@contextmanager
def serve(model_dir: str | os.PathLike, repo_id: str, *extra: str, timeout: float = 120.0) -> Iterator[Mock]:
    """Run server.py on 127.0.0.1 serving `model_dir` as `repo_id`; `extra` are more server.py flags."""
    cmd = [sys.executable, str(SERVER), "--model", str(model_dir), "--repo-id", repo_id, *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a full pipe would stall the server
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        try:
            line = process.stdout.readline()  # "PORT <n>" once it listens, or EOF if it died
            if not line.startswith("PORT "):
                process.kill()
                process.wait(timeout=timeout)
                log.seek(0)
                raise RuntimeError(f"the NDIF mock did not start: {line!r} {log.read()[-2000:].decode(errors='replace')}")
            yield Mock(f"http://127.0.0.1:{int(line.split()[1])}", process)
        finally:
            process.kill()
            process.wait(timeout=timeout)
