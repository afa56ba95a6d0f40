"""Remote recording: nnsight's local round trip, and a loopback NDIF that has no attnflow.

`remote="local"` serialises each trace the way a remote request is serialised,
deserialises it with user modules hidden, and runs it: it must equal the local
trace exactly.  `ndif_mock/server.py` goes further: a separate process where
`import attnflow` fails deserialises the request as NDIF does and runs it on its
own copy of the weights, so equality with a local run proves a real server could
run attnflow's request.  The mock answers in the shapes of the real server (ndif
0.1.2): /status entries named "<replica>:ModelActor:<model key>" (repo_id may be
None) and COLD entries for cached models, auth only when configured (401 no key,
400 malformed, 403 unknown), the version gate's own text, and results above the
inline cap fetched from a URL (the object store).  The errors a user meets before
and after sending (no key, a bad key, a model the host does not serve,
mismatched nnsight versions, an unreachable or plain-http host) each come back
as one-line errors.  tests/ndif_real/ runs the same cases against the real server.
"""

from __future__ import annotations

import cloudpickle
import nnsight
import pytest
import torch
from ndif_mock import serve
from nnsight.modeling import huggingface as nnsight_hf
from tiny_models import prompts_ids, tiny_model, tiny_tokenizer

import attnflow as af
from attnflow.cli import main as cli
from attnflow.errors import BadArgumentError, RemoteError
from attnflow.tracers import reduce, remote

REPO = "attnflow-test/tiny-llama"  # the hub id the mock claims to host
COLD = "attnflow-test/cold-model"  # in the open mock's cache, never deployed
KEY = "0b6c7c8e-5a1f-4c0e-9d0c-3f0f3c1d2e4a"
PROMPTS = prompts_ids((6, 11))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return af.load(model_dir)


@pytest.fixture(scope="module")
def mock(model_dir):
    with serve(model_dir, REPO, "--api-key", KEY) as server:
        yield server


@pytest.fixture(scope="module")
def open_mock(model_dir):
    """A server without auth whose /status has no repo_id, a COLD model, and a 2 KiB inline cap."""
    with serve(model_dir, REPO, "--no-repo-id", "--cold", COLD, "--inline-cap", "2048") as server:
        yield server


@pytest.fixture
def open_ndif(open_mock, model_dir, monkeypatch):
    """nnsight's client pointed at the open mock, with no API key anywhere."""
    monkeypatch.setattr(nnsight.CONFIG.API, "HOST", open_mock.url)
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    monkeypatch.setattr(nnsight.CONFIG.APP, "REMOTE_LOGGING", False)
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.delenv("NDIF_HOST", raising=False)
    monkeypatch.setitem(nnsight_hf._ID_CACHE, str(model_dir), REPO)
    monkeypatch.setattr(remote, "_CHECKED", set())
    return open_mock


@pytest.fixture
def ndif(mock, model_dir, monkeypatch):
    """nnsight's client pointed at the mock, with the right key; the hub id lookup answered offline."""
    monkeypatch.setattr(nnsight.CONFIG.API, "HOST", mock.url)
    monkeypatch.setattr(nnsight.CONFIG.APP, "REMOTE_LOGGING", False)
    monkeypatch.setenv("NDIF_API_KEY", KEY)
    monkeypatch.delenv("NDIF_HOST", raising=False)
    monkeypatch.setitem(nnsight_hf._ID_CACHE, str(model_dir), REPO)  # what HfApi().model_info(...).id would say
    monkeypatch.setattr(remote, "_CHECKED", set())
    mock.configure()
    return mock


def same(a: af.AttentionTrace, b: af.AttentionTrace) -> None:
    assert torch.equal(a.patterns, b.patterns)
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.query_positions, b.query_positions)
    assert a.prompt_lengths == b.prompt_lengths


CASES = [dict(), dict(heads="max", rows=[0, -1], layers=[-1])]


# --- nnsight's local serialisation round trip ----------------------------------------------------
@pytest.mark.parametrize("kwargs", CASES, ids=["all", "max-rows-layer"])
def test_remote_local_equals_local(model, kwargs):
    local = af.trace(model, PROMPTS, dtype=torch.float32, progress=False, **kwargs)
    rt = af.trace(model, PROMPTS, dtype=torch.float32, progress=False, remote="local", **kwargs)
    same(local, rt)
    assert rt.patterns.abs().sum() > 0


def test_remote_local_generation_equals_local(model):
    """A remote generation records while it generates, as a local one does; one_pass=False is two passes on both."""
    kw = dict(max_new_tokens=4, heads="mean", rows="completion", progress=False, dtype=torch.float32)
    rt = af.trace(model, PROMPTS, remote="local", **kw)
    same(af.trace(model, PROMPTS, **kw), rt)
    same(af.trace(model, PROMPTS, one_pass=False, **kw), af.trace(model, PROMPTS, remote="local", one_pass=False, **kw))
    two_pass = af.trace(model, PROMPTS, one_pass=False, **kw)
    torch.testing.assert_close(rt.patterns, two_pass.patterns, rtol=0, atol=1e-6)  # the cache's keys are the same keys
    assert [len(t) for t in rt.tokens] == [len(t) for t in two_pass.tokens]
    assert all(n > p for n, p in zip(rt.lengths, rt.prompt_lengths))


# --- the loopback NDIF without attnflow -------------------------------------------------------------
def test_mock_ndif_runs_attnflow_request_without_attnflow(model, ndif, capsys):
    before = len(ndif.stats())
    local = af.trace(model, PROMPTS, dtype=torch.float32, progress=False)
    got = af.trace(model, PROMPTS, dtype=torch.float32, progress=False, remote=True)
    same(local, got)
    reduced_local = af.trace(model, PROMPTS, heads="mean", rows="last", progress=False)
    reduced = af.trace(model, PROMPTS, heads="mean", rows="last", progress=False, remote=True)
    same(reduced_local, reduced)
    jobs = ndif.stats()[before:]
    assert len(jobs) == 2 and not any(j["attnflow_imported"] for j in jobs)
    full, small = jobs
    with capsys.disabled():
        print(f"\n[mock NDIF] heads=all rows=all: request {full['request_bytes']} B, result {full['result_bytes']} B; "
              f"heads=mean rows=last (float16): request {small['request_bytes']} B, result {small['result_bytes']} B")
    assert small["result_bytes"] * 4 < full["result_bytes"]  # only the reduced rows come back


def test_mock_ndif_generation_equals_local(model, ndif):
    """One request per batch records while generating; one_pass=False sends two (generate, then the forward)."""
    kw = dict(max_new_tokens=3, heads="mean", rows="completion", progress=False, dtype=torch.float32)
    before = len(ndif.stats())
    same(af.trace(model, PROMPTS, **kw), af.trace(model, PROMPTS, remote=True, **kw))
    middle = len(ndif.stats())
    same(af.trace(model, PROMPTS, one_pass=False, **kw), af.trace(model, PROMPTS, remote=True, one_pass=False, **kw))
    assert (middle - before, len(ndif.stats()) - middle) == (1, 2)


def test_mock_ndif_records_norms_without_attnflow(model, ndif):
    """norms=True and heads="norm" run where the weights are: the value factors come from the server's o_proj."""
    before = len(ndif.stats())
    for kw in (dict(heads="norm"), dict(heads="mean", rows="completion", max_new_tokens=3)):
        kw.update(norms=True, dtype=torch.float32, progress=False)
        local = af.trace(model, PROMPTS, **kw)
        got = af.trace(model, PROMPTS, remote=True, **kw)  # with max_new_tokens: one pass, the factors made there
        torch.testing.assert_close(got.patterns, local.patterns, rtol=1e-6, atol=1e-7)
        assert got.input_ids.tolist() == local.input_ids.tolist()
        for k in local.norms:
            torch.testing.assert_close(got.norms[k], local.norms[k], rtol=1e-6, atol=1e-7)
            assert got.norms[k].abs().sum() > 0
    assert not any(j["attnflow_imported"] for j in ndif.stats()[before:])


def test_mock_rejects_request_without_registered_helpers(model, ndif, monkeypatch):
    """Control: unregistered, reduce.py is pickled by reference and the server cannot import it."""
    monkeypatch.setattr(remote, "register", lambda: None)
    cloudpickle.unregister_pickle_by_value(reduce)
    try:
        with pytest.raises(RemoteError, match="no attnflow"):
            af.trace(model, PROMPTS, heads="mean", rows="last", progress=False, remote=True)
    finally:
        cloudpickle.register_pickle_by_value(reduce)


def test_cli_trace_remote_without_local_weights(model, model_dir, ndif, tmp_path):
    """`attnflow trace --remote` opens config and tokenizer only; the mock's weights do the work."""
    args = ["trace", str(model_dir), "--prompt", "the cat sat on the mat", "--prompt", "bob lives in paris",
            "--heads", "mean", "--dtype", "float32", "--no-progress"]
    assert cli(args + ["--remote", "--out", str(tmp_path / "remote")]) == 0
    assert cli(args + ["--out", str(tmp_path / "local")]) == 0
    same(af.AttentionTrace.load(tmp_path / "local"), af.AttentionTrace.load(tmp_path / "remote"))


# --- errors -------------------------------------------------------------------------------------
def test_missing_api_key(model, ndif, monkeypatch):
    monkeypatch.delenv("NDIF_API_KEY")
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    with pytest.raises(RemoteError, match="no NDIF API key: set NDIF_API_KEY"):
        af.trace(model, PROMPTS, progress=False, remote=True)


def test_api_key_from_nnsight_config(model, ndif, monkeypatch):
    monkeypatch.delenv("NDIF_API_KEY")
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", KEY)
    assert af.trace(model, PROMPTS, heads="mean", rows="last", progress=False, remote=True).patterns.shape[:3] == (2, 2, 1)


def test_wrong_api_key(model, ndif, monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", "not-a-key")
    with pytest.raises(RemoteError, match="rejected the API key"):
        af.trace(model, PROMPTS, progress=False, remote=True)


def test_model_not_hosted(model, model_dir, ndif, monkeypatch):
    monkeypatch.setitem(nnsight_hf._ID_CACHE, str(model_dir), "someone/not-hosted")
    with pytest.raises(RemoteError, match=r"does not host 'someone/not-hosted' \(it hosts attnflow-test/tiny-llama\)"):
        af.trace(model, PROMPTS, progress=False, remote=True)


def test_server_runs_other_nnsight(model, ndif):
    ndif.configure(nnsight_version="0.7.2")
    with pytest.raises(RemoteError, match=rf"runs nnsight 0.7.2 but this client has nnsight {nnsight.__version__}"):
        af.trace(model, PROMPTS, progress=False, remote=True)


def test_server_refuses_old_client(model, ndif):
    ndif.configure(min_nnsight_version="99.0")  # same minor in /env, but the request gate says no
    with pytest.raises(RemoteError, match="refused this client .*below the minimum supported 99.0"):
        af.trace(model, PROMPTS, progress=False, remote=True)


def test_unreachable_host(model, ndif):
    with pytest.raises(RemoteError, match="cannot reach NDIF at http://127.0.0.1:9"):
        af.trace(model, PROMPTS, progress=False, remote="http://127.0.0.1:9")


def test_local_model_path_cannot_be_named(model, model_dir, ndif, monkeypatch):
    monkeypatch.delitem(nnsight_hf._ID_CACHE, str(model_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RemoteError, match="NDIF cannot name the model"):
        af.trace(model, PROMPTS, progress=False, remote=True)


def test_plain_pretrained_model_cannot_go_remote(ndif):
    with pytest.raises(RemoteError, match="cannot run on NDIF"):
        af.trace(tiny_model("llama"), PROMPTS, progress=False, remote=True)


def test_bad_remote_value(model):
    with pytest.raises(BadArgumentError, match="remote='ndif'"):
        af.trace(model, PROMPTS, progress=False, remote="ndif")


def test_server_messages_are_explained():
    assert "rejected the API key" in remote.explain("Failed to send request: Missing or invalid API key.")
    assert remote.explain("Failed to send request: Missing or invalid API key.", key_sent=False).startswith(
        "no NDIF API key: set NDIF_API_KEY")
    assert "refused this client" in remote.explain(
        "Failed to send request: Client nnsight version 0.7.0 is below the minimum supported 0.8.0. "
        "Please `pip install --upgrade nnsight`."
    )
    assert "does not serve this model" in remote.explain("Error provisioning model. Please try again later.")
    assert "does not serve this model" in remote.explain("Could not deploy this model. Repository Not Found")
    assert "refused this client" in remote.explain(
        "Client nnsight version 0.5.0 is incompatible with the server nnsight version. The minimum supported version is 0.6"
    )
    assert remote.explain("Traceback (most recent call last):\n  ...\nValueError: boom").endswith("failed: ValueError: boom")


# --- the real server's shapes: no auth, /status naming, COLD, the object store, key errors -----------
def test_unknown_uuid_key_is_rejected(model, ndif, monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", "11111111-2222-3333-4444-555555555555")  # well-formed, not issued: 403
    with pytest.raises(RemoteError, match=r"rejected the API key \(Invalid API key\.\)"):
        af.trace(model, PROMPTS, progress=False, remote=True)


def test_malformed_key_is_rejected(model, ndif, monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", "not-a-key")  # not a UUID: 400
    with pytest.raises(RemoteError, match="rejected the API key .*Invalid API key format: 'not-a-key'"):
        af.trace(model, PROMPTS, progress=False, remote=True)


def test_server_without_auth_needs_no_key(model, open_ndif):
    """Nothing sets a key, /status has repo_id None (matched through its model key), and the result is local's."""
    local = af.trace(model, PROMPTS, heads="mean", rows="last", progress=False)
    same(local, af.trace(model, PROMPTS, heads="mean", rows="last", progress=False, remote=True))
    assert open_ndif.stats()[-1]["inline"]


def test_status_names_replicas_by_actor(open_ndif):
    import httpx

    deployments = httpx.get(f"{open_ndif.url}/status").json()["deployments"]
    replica = next(name for name in deployments if ":ModelActor:" in name)
    assert deployments[replica]["repo_id"] is None and deployments[COLD]["deployment_level"] == "COLD"
    assert remote.hosted_id(replica, deployments[replica]) == REPO
    assert remote.hosted_id(COLD, deployments[COLD]) == COLD


def test_result_above_inline_cap_comes_from_object_store(model, open_ndif):
    before = len(open_ndif.stats())
    local = af.trace(model, PROMPTS, dtype=torch.float32, progress=False)
    got = af.trace(model, PROMPTS, dtype=torch.float32, progress=False, remote=True)
    same(local, got)
    (job,) = open_ndif.stats()[before:]
    assert job["result_bytes"] > 2048 and not job["inline"]


def test_cold_model_counts_as_hosted(model, model_dir, open_ndif, monkeypatch):
    """COLD passes the pre-flight check (NDIF loads it on request); this mock cannot load it, so the job fails."""
    monkeypatch.setitem(nnsight_hf._ID_CACHE, str(model_dir), COLD)
    remote.check_hosted(open_ndif.url, model.to_model_key())  # no error
    with pytest.raises(RemoteError, match="does not serve this model .*Error provisioning model"):
        af.trace(model, PROMPTS, progress=False, remote=True)


@pytest.mark.parametrize("url", ["http://example.org", "http://10.0.0.7:8001", "http://127.0.0.1.example.org"])
def test_plain_http_refused_except_loopback(model, url):
    with pytest.raises(BadArgumentError, match="plain http .*would send the API key in clear"):
        af.trace(model, PROMPTS, progress=False, remote=url)


def test_plain_http_host_from_environment_refused(model, monkeypatch):
    monkeypatch.setenv("NDIF_HOST", "http://ndif.example.org")
    with pytest.raises(BadArgumentError, match="NDIF_HOST: plain http to 'ndif.example.org'"):
        af.trace(model, PROMPTS, progress=False, remote=True)


@pytest.mark.parametrize("url", ["http://localhost:9", "http://[::1]:9", "http://127.0.0.2:9"])
def test_plain_http_to_loopback_allowed(model, ndif, url):
    with pytest.raises(RemoteError, match="cannot reach NDIF"):  # accepted, then nothing listens there
        af.trace(model, PROMPTS, progress=False, remote=url)
