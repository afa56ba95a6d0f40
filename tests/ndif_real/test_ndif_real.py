"""attnflow's remote recording through the real NDIF server (ndif 0.1.2), started here on 127.0.0.1.

Opt-in: `ATTNFLOW_NDIF_REAL=1` (and tests/ndif_real/setup.sh run once); skipped
otherwise.  The stack (`stack.py`) serves two models from an offline HF cache, a
tiny random Llama and attnflow's embedded demo model, without attnflow installed
on the server.  Every case is one `attnflow.trace(..., remote=True)` (or the
CLI's `--remote`) compared with the same call run locally: the patterns must be
equal, max abs diff 0.0.  Also: a result above the inline cap, which NDIF stages
in the object store and the client downloads; the untrusted request path, which
NDIF runs in a separate sandbox runner process; a COLD model (in the server's
cache, not deployed) passes attnflow's check and its failure is explained.  No
API key is set anywhere: this server has no auth.

    ATTNFLOW_NDIF_REAL=1 python -m pytest -q -s tests/ndif_real/
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

if os.environ.get("ATTNFLOW_NDIF_REAL") != "1":
    pytest.skip("the real-NDIF test is opt-in: set ATTNFLOW_NDIF_REAL=1 (after tests/ndif_real/setup.sh)",
                allow_module_level=True)

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

# Client and server read one offline HF cache.  huggingface_hub reads these at import,
# so set them first (and patch its constants if another test module imported it already).
HF_HOME = Path(tempfile.mkdtemp(prefix="attnflow-ndif-real-hf-"))
os.environ.update(HF_HOME=str(HF_HOME), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
if "huggingface_hub" in sys.modules:
    from huggingface_hub import constants

    constants.HF_HOME, constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = str(HF_HOME), str(HF_HOME / "hub"), True

import nnsight  # noqa: E402
import torch  # noqa: E402
from nnsight.modeling import huggingface as nnsight_hf  # noqa: E402
from stack import Stack, put_in_hf_cache  # noqa: E402
from tiny_models import prompts_ids, tiny_model, tiny_tokenizer  # noqa: E402

import attnflow as af  # noqa: E402
from attnflow.cli import main as cli  # noqa: E402
from attnflow.demo import MODEL_DIR as DEMO_DIR  # noqa: E402
from attnflow.errors import RemoteError  # noqa: E402
from attnflow.tracers import remote  # noqa: E402

TINY, DEMO, COLD = "attnflow-test/tiny-llama", "attnflow-test/demo", "attnflow-test/cold-llama"
INLINE_CAP = 128 << 10  # Redis pubsub soft limit, so NDIF inlines results up to 128 KiB
PROMPTS = prompts_ids((6, 11))
LONG = prompts_ids((64, 64, 64, 64))  # heads="all" for these is ~0.5 MiB: above the inline cap
DEMO_PROMPTS = ["doc 1: ada lives in paris. doc 2: bob works at acme.\nquestion: where does ada live?\nanswer:",
                "doc 1: cy plays chess.\nquestion: what does cy play?\nanswer:"]
REPORT: list[str] = []


def diff(a: af.AttentionTrace, b: af.AttentionTrace) -> float:
    assert a.patterns.shape == b.patterns.shape and a.patterns.dtype == b.patterns.dtype
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.query_positions, b.query_positions)
    assert a.prompt_lengths == b.prompt_lengths and a.lengths == b.lengths
    return (a.patterns.float() - b.patterns.float()).abs().max().item()


@contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check(name: str, model, prompts, **kwargs) -> af.AttentionTrace:
    """Remote equals local exactly.  A generation records while it generates on both sides (one request per batch);
    with `one_pass=False` both generate, then record in a second forward, and are equal too.

    The local twin runs torch on one thread, as the CPU actor does (Ray's num_cpus=1 sets OMP_NUM_THREADS=1): a
    one-token decode step's float32 sums depend on the thread count (4.5e-8 on the tiny Llama with 2 threads).
    """
    generates = bool(kwargs.get("max_new_tokens"))
    with one_thread():
        local = af.trace(model, prompts, progress=False, **kwargs)
    t = time.perf_counter()
    got = af.trace(model, prompts, progress=False, remote=True, **kwargs)
    d = diff(local, got)
    line = f"{name:<34} {str(tuple(got.patterns.shape)):<24} {time.perf_counter() - t:6.2f} s  max abs diff {d}"
    if generates:
        two = dict(kwargs, one_pass=False)
        with one_thread():
            local_two = af.trace(model, prompts, progress=False, **two)
        d_two = diff(local_two, af.trace(model, prompts, progress=False, remote=True, **two))
        line += f" (one_pass=False: {d_two})"
        assert d_two == 0.0
    REPORT.append(line)
    assert d == 0.0 and got.patterns.abs().sum() > 0
    return got


@pytest.fixture(scope="module")
def ndif(tmp_path_factory):
    work = tmp_path_factory.mktemp("ndif-real")
    stack = Stack(work, inline_cap=INLINE_CAP, hf_home=HF_HOME)
    tiny = work / "tiny"
    tiny_model("llama").save_pretrained(tiny)
    tiny_tokenizer().save_pretrained(tiny)
    for repo, src in ((TINY, tiny), (DEMO, DEMO_DIR), (COLD, tiny)):
        put_in_hf_cache(stack.hf_home, repo, src)
    saved = {k: os.environ.get(k) for k in ("NDIF_API_KEY", "NDIF_HOST")}
    os.environ.pop("NDIF_API_KEY", None)
    os.environ.pop("NDIF_HOST", None)
    host, key, logging = nnsight.CONFIG.API.HOST, nnsight.CONFIG.API.APIKEY, nnsight.CONFIG.APP.REMOTE_LOGGING
    for repo in (TINY, DEMO, COLD):
        nnsight_hf._ID_CACHE[repo] = repo  # what the hub would answer for the canonical id, offline
    t0 = time.perf_counter()
    try:
        with stack:
            started = time.perf_counter() - t0
            models = {repo: af.load(repo) for repo in (TINY, DEMO)}
            for repo, model in models.items():
                stack.deploy(model.to_model_key(), size_bytes=64 << 20)
            nnsight.CONFIG.API.HOST, nnsight.CONFIG.API.APIKEY, nnsight.CONFIG.APP.REMOTE_LOGGING = stack.url, None, False
            remote._CHECKED.clear()
            REPORT.append(f"stack up in {started:.0f} s, both models deployed after {time.perf_counter() - t0:.0f} s")
            yield stack, models
            REPORT.append(f"all cases done after {time.perf_counter() - t0:.0f} s; stopping")
        left = stack.ours()
        REPORT.append(f"stopped (SIGTERM to each process group; SIGKILL needed for: {stack.last_killed or 'none'}); "
                      f"processes left running: {len(left)}")
        assert not left
    finally:
        nnsight.CONFIG.API.HOST, nnsight.CONFIG.API.APIKEY, nnsight.CONFIG.APP.REMOTE_LOGGING = host, key, logging
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        shutil.rmtree(HF_HOME, ignore_errors=True)
        print("\n[real NDIF] " + "\n[real NDIF] ".join(REPORT), flush=True)


def results_in_object_store(stack: Stack) -> list[str]:
    """Result blobs ("<request id>.pt") in NDIF's bucket; none before the bucket exists."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{stack.ports['s3']}/ndif-results?list-type=2", timeout=30) as r:
            return re.findall(r"<Key>([^<]+\.pt)</Key>", r.read().decode())
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return []
        raise


def runner_pids(stack: Stack) -> set[int]:
    """PIDs of NDIF's sandbox runner processes (`python -m ...sandbox.runner`) of this stack."""
    pids = set()
    for pid in stack.ours():
        try:
            if b"sandbox.runner" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.add(pid)
        except OSError:
            pass
    return pids


def test_status_lists_both_deployments_and_the_cold_model(ndif):
    stack, models = ndif
    with urllib.request.urlopen(f"{stack.url}/status", timeout=60) as r:
        deployments = json.loads(r.read())["deployments"]
    REPORT.append(f"/status deployments: {json.dumps(deployments)[:600]}")
    levels: dict[str, set] = {}
    for name, entry in deployments.items():
        kind = "replica" if ":ModelActor:" in name else entry.get("deployment_level")
        levels.setdefault(remote.hosted_id(name, entry), set()).add(f"{kind}:{entry.get('application_state', '-')}")
    REPORT.append(f"/status by hub id: {levels}")
    # A model deployed with an explicit size has no description, so its replica entry is bare
    # ({"application_state": "RUNNING"}, no repo_id or model_key) and its repo is also listed COLD.
    assert "replica:RUNNING" in levels[TINY] and "replica:RUNNING" in levels[DEMO]
    assert levels[COLD] == {"COLD:-"}


@pytest.mark.parametrize("case", [
    ("tiny: all heads, all rows", dict(dtype=torch.float32)),
    ("tiny: head-mean, last row", dict(heads="mean", rows="last")),
    ("tiny: head-max, rows 0,-1, layer -1", dict(heads="max", rows=[0, -1], layers=[-1], dtype=torch.float32)),
    ("tiny: all heads, layers 0,1", dict(layers=[0, 1], dtype=torch.float32)),
], ids=lambda c: c[0])
def test_tiny_equals_local(ndif, case):
    stack, models = ndif
    check(case[0], models[TINY], PROMPTS, **case[1])


def test_tiny_generation_equals_local(ndif):
    stack, models = ndif
    got = check("tiny: generate 3, mean, completion", models[TINY], PROMPTS, max_new_tokens=3, heads="mean",
                rows="completion", dtype=torch.float32)
    assert all(n > p for n, p in zip(got.lengths, got.prompt_lengths))


def test_generation_with_norms_equals_local(ndif):
    """norms=True while generating: the value factors come from the server's o_proj, inside the one request."""
    stack, models = ndif
    kw = dict(max_new_tokens=3, heads="norm", rows=None, norms=True, dtype=torch.float32, progress=False)
    with one_thread():
        local = af.trace(models[DEMO], DEMO_PROMPTS, **kw)
    got = af.trace(models[DEMO], DEMO_PROMPTS, remote=True, **kw)
    d = diff(local, got)
    d_norms = max((got.norms[k] - local.norms[k]).abs().max().item() for k in local.norms)
    REPORT.append(f"{'demo: generate 3, norm, norms':<34} {str(tuple(got.patterns.shape)):<24} max abs diff {d}, "
                  f"norms {d_norms}")
    assert d == 0.0 and d_norms == 0.0 and all(got.norms[k].abs().sum() > 0 for k in got.norms)


@pytest.mark.parametrize("case", [
    ("demo: all heads, all rows", dict(dtype=torch.float32)),
    ("demo: head-mean, last row", dict(heads="mean", rows="last")),
    ("demo: generate 4, mean, completion", dict(max_new_tokens=4, heads="mean", rows="completion", dtype=torch.float32)),
], ids=lambda c: c[0])
def test_demo_equals_local(ndif, case):
    stack, models = ndif
    check(case[0], models[DEMO], DEMO_PROMPTS, **case[1])


def test_result_above_inline_cap_comes_from_object_store(ndif):
    stack, models = ndif
    before = results_in_object_store(stack)
    got = check("tiny: all heads, 4x64 tokens (S3)", models[TINY], LONG, dtype=torch.float32)
    staged = sorted(set(results_in_object_store(stack)) - set(before))
    REPORT.append(f"  result staged in the object store: {staged} ({got.patterns.nbytes:,} B of patterns, cap {INLINE_CAP:,} B)")
    assert len(staged) == 1


def test_small_result_is_inline(ndif):
    stack, models = ndif
    before = results_in_object_store(stack)
    check("tiny: head-mean, last row (inline)", models[TINY], PROMPTS, heads="mean", rows="last")
    assert results_in_object_store(stack) == before


def test_untrusted_request_runs_in_sandbox_runner(ndif, monkeypatch):
    """A request marked trusted=False (honoured by an NDIF without auth) runs in a fresh runner process."""
    from nnsight.schema.request import RequestModel

    stack, models = ndif
    metadata = RequestModel.metadata
    monkeypatch.setattr(RequestModel, "metadata", lambda self: json.dumps({**json.loads(metadata(self)), "trusted": False}))
    before = runner_pids(stack)
    for name, repo, prompts in (("tiny", TINY, PROMPTS), ("demo", DEMO, DEMO_PROMPTS)):
        check(f"{name}: untrusted (sandbox), all heads", models[repo], prompts, dtype=torch.float32)
        check(f"{name}: untrusted (sandbox), mean, last", models[repo], prompts, heads="mean", rows="last")
    check("tiny: untrusted (sandbox), generate 3", models[TINY], PROMPTS, max_new_tokens=3, heads="mean", rows=None,
          dtype=torch.float32)
    time.sleep(2)  # the pool replaces each used runner
    spawned = runner_pids(stack) - before
    REPORT.append(f"  sandbox runners: {len(before)} pre-warmed before, {len(spawned)} new after the untrusted cases")
    assert spawned


def test_cli_trace_remote_equals_local(ndif, tmp_path):
    stack, models = ndif
    args = ["trace", TINY, "--prompt", "the cat sat on the mat", "--prompt", "bob lives in paris",
            "--heads", "mean", "--dtype", "float32", "--no-progress"]
    t = time.perf_counter()
    assert cli(args + ["--remote", "--out", str(tmp_path / "remote")]) == 0
    seconds = time.perf_counter() - t
    assert cli(args + ["--out", str(tmp_path / "local")]) == 0
    got = af.AttentionTrace.load(tmp_path / "remote")
    d = diff(af.AttentionTrace.load(tmp_path / "local"), got)
    REPORT.append(f"{'CLI: trace --remote, mean':<34} {str(tuple(got.patterns.shape)):<24} {seconds:6.2f} s  max abs diff {d}")
    assert d == 0.0


def test_cold_model_passes_check_and_failure_is_explained(ndif):
    stack, models = ndif
    cold = af.load(COLD)
    remote.check_hosted(stack.url, cold.to_model_key())  # COLD counts as hosted
    with pytest.raises(RemoteError) as err:
        af.trace(cold, PROMPTS, progress=False, remote=True)
    REPORT.append(f"  COLD model request: {err.value}")
    assert "does not serve this model" in str(err.value)
