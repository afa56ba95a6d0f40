"""`attnflow serve` in process (Starlette TestClient) on the demo model: the graph against flow.rollout, the guard.

References are independent of the server: the rollout row comes from `af.flow.rollout`
over a separate all-heads recording of the same tokens (heads averaged by flow.py,
not by the tracer), and per-head rows from a separate `af.trace(heads="all")`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import threading
import zipfile

import numpy as np
import pytest
import torch
from starlette.testclient import TestClient

import attnflow as af
from attnflow.explorer.app import create_app
from attnflow.explorer.graph import flow_graph
from attnflow.explorer.runs import Limits

TOKEN = "test-token-0123456789abcdef"
BASE = "http://127.0.0.1:8765"
H = {"x-attnflow-token": TOKEN}
DOCS = [{"name": "doc1", "text": "bob owns a cat ."}, {"name": "doc2", "text": "alice lives in paris ."}]
PROMPT = "question : what is the city of alice ?\nanswer :"


@pytest.fixture(scope="module")
def model():
    return af.demo.load()


@pytest.fixture(scope="module")
def app(model):
    return create_app({"demo": lambda: model}, TOKEN, limits=Limits(max_tokens=120))


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app, base_url=BASE)


def start_run(client, **body) -> str:
    r = client.post("/api/runs", json={"model": "demo", "prompt": PROMPT, "documents": DOCS, "max_new_tokens": 3, **body},
                    headers=H)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def events(client, run_id) -> list[tuple[str, dict]]:
    out, name = [], None
    with client.stream("GET", f"/api/runs/{run_id}/events", headers=H) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        for line in s.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[6:])))
    return out


@pytest.fixture(scope="module")
def run(client):
    rid = start_run(client)
    evs = events(client, rid)
    assert evs[-1][0] == "done", evs
    return rid, evs


@pytest.fixture(scope="module")
def reference(model, client, run):
    """An independent all-heads recording of the run's tokens: [layer, head, query, key]."""
    rid, _ = run
    info = client.get(f"/api/runs/{rid}", headers=H).json()
    ids = model.tokenizer.convert_tokens_to_ids(info["tokens"])
    tr = af.trace(model, [ids], heads="all", dtype=torch.float32, progress=False)
    return info, tr.patterns


# ----------------------------------------------------------------------------- the run
def test_run_streams_tokens_then_records(client, run, model):
    rid, evs = run
    names = [e for e, _ in evs]
    assert names[0] == "queued" and names.index("token") < names.index("recorded") < names.index("done")
    info = client.get(f"/api/runs/{rid}", headers=H).json()
    streamed = [d["token"] for e, d in evs if e == "token"]
    assert info["tokens"][info["prompt_length"]:] == streamed
    # greedy, independently: the demo model answers the question from doc2
    hf_ids = model.tokenizer(f"doc1 : {DOCS[0]['text']}\ndoc2 : {DOCS[1]['text']}\n{PROMPT}")["input_ids"]
    assert info["tokens"][: info["prompt_length"]] == model.tokenizer.convert_ids_to_tokens(hf_ids)
    assert streamed[0] == "paris"
    assert [s["name"] for s in info["spans"]] == ["doc1", "doc2"]
    d2 = info["spans"][1]
    assert info["tokens"][d2["start"]:d2["end"]] == ["alice", "lives", "in", "paris", "."]


# ----------------------------------------------------------------------------- the graph
@pytest.mark.parametrize("sinks", [True, False])
@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_graph_bottom_row_is_rollout(client, run, reference, sinks, alpha):
    rid, _ = run
    info, A = reference
    n = len(info["tokens"])
    for target in (info["prompt_length"], n - 1, 5):
        g = client.get(f"/api/runs/{rid}/graph", params={"target": target, "tau": 0.01, "alpha": alpha,
                                                          "sinks": int(sinks), "bottom": 1}, headers=H).json()
        R = af.flow.rollout(A, alpha=alpha, rows=[target - 1], exclude_keys=(0,) if sinks else ())[0, 0]
        assert g["target"] == target and g["target_row"] == target - 1
        np.testing.assert_allclose(np.array(g["bottom"]), R.numpy(), rtol=0, atol=1e-6)
        if sinks:
            plain = af.flow.rollout(A, alpha=alpha, rows=[target - 1])[0, 0]
            assert g["sink_share"] == pytest.approx(float(plain[0]), abs=1e-6) and g["sink_share"] > 0
        else:
            assert g["sink_share"] == 0.0


@pytest.mark.parametrize("tau", [0.005, 0.01, 0.05, 0.2])
def test_graph_edges_per_layer_at_most_one_over_tau(client, run, tau):
    rid, _ = run
    g = client.get(f"/api/runs/{rid}/graph", params={"tau": tau}, headers=H).json()
    assert len(g["edges"]) == g["layers"] == 4
    for layer in g["edges"]:
        assert len(layer) <= 1 / tau
        assert all(w >= tau - 1e-5 for _, _, w in layer)
        assert sum(w for _, _, w in layer) <= 1 + 1e-4
    assert g["edge_counts"] == [len(e) for e in g["edges"]]
    # every drawn endpoint is a column; gaps cover the rest exactly once
    drawn = {g["target_row"]} | {p for layer in g["edges"] for s, d, _ in layer for p in (s, d)}
    cols = [c["pos"] for c in g["columns"] if "pos" in c]
    covered = cols + [i for c in g["columns"] if "gap" in c for i in range(*c["gap"])]
    assert set(cols) == drawn and sorted(covered) == list(range(g["length"]))


def test_graph_top_k_and_smaller_tau_draws_more(client, run):
    rid, _ = run
    counts = [sum(client.get(f"/api/runs/{rid}/graph", params={"tau": t}, headers=H).json()["edge_counts"])
              for t in (0.2, 0.05, 0.01)]
    assert counts[0] < counts[1] < counts[2]
    g = client.get(f"/api/runs/{rid}/graph", params={"top_k": 3}, headers=H).json()
    assert g["edge_counts"] == [3, 3, 3, 3] and g["tau"] is None


def test_graph_function_matches_rollout_on_random_patterns():
    torch.manual_seed(0)
    A = torch.rand(5, 40, 40, dtype=torch.float64).tril() ** 4  # peaked rows
    A = A / A.sum(-1, keepdim=True)
    for ex, q, alpha in (((), 39, 0.5), ((0,), 17, 0.3), ((0, 3), 39, 1.0)):
        g = flow_graph(A, q, tau=0.02, alpha=alpha, exclude_keys=ex)
        R = af.flow.rollout(A[None, :, None], alpha=alpha, rows=[q], exclude_keys=ex)[0, 0]
        assert torch.allclose(torch.tensor(g["bottom"], dtype=torch.float64), R, atol=1e-12, rtol=0)
        R32 = af.flow.rollout(A.float()[None, :, None], alpha=alpha, rows=[q], exclude_keys=ex)[0, 0]
        g32 = flow_graph(A.float(), q, tau=0.02, alpha=alpha, exclude_keys=ex)
        assert torch.allclose(torch.tensor(g32["bottom"]), R32, atol=1e-3, rtol=0)  # float32 on ill-conditioned rows
        assert all(c <= 1 / 0.02 for c in g["edge_counts"])
        # an edge's weight is its source's mass times the layer's step, so the drawn mass into a node never exceeds it
        for l, layer in enumerate(g["edges"]):
            below = dict(map(tuple, g["nodes"][l]))
            into: dict[int, float] = {}
            for _, d, w in layer:
                into[d] = into.get(d, 0.0) + w
            assert all(v <= below[d] + 1e-4 for d, v in into.items())


# ----------------------------------------------------------------------------- heads, attribution, export
def test_heads_use_shard_encoding_and_match_an_all_heads_trace(client, run, reference):
    rid, _ = run
    _, A = reference
    rows = [3, 10, 20]
    r = client.get(f"/api/runs/{rid}/heads", params={"layer": 2, "rows": ",".join(map(str, rows))}, headers=H).json()
    codes = np.frombuffer(base64.b64decode(r["data"]), dtype=np.uint8)
    scales = np.frombuffer(base64.b64decode(r["scales"]), dtype="<f4").reshape(r["num_heads"], len(rows))
    assert r["num_heads"] == 8 and codes.size == 8 * sum(q + 1 for q in rows)
    at = 0
    for h in range(8):
        for i, q in enumerate(rows):
            got = codes[at : at + q + 1] / 255 * scales[h, i]
            at += q + 1
            np.testing.assert_allclose(got, A[0, 2, h, q, : q + 1].numpy(), atol=scales[h, i] / 255)
    assert client.get(f"/api/runs/{rid}/heads", params={"layer": 9, "rows": "1"}, headers=H).status_code == 400


def test_attribution_shares_sum_to_one_and_favour_the_support(client, run):
    rid, _ = run
    a = client.get(f"/api/runs/{rid}/attribution", headers=H).json()
    total = sum(d["score"] for d in a["documents"]) + a["excluded"] + a["completion"] + a["other_prompt"]
    assert total == pytest.approx(1.0, abs=1e-5)
    best = min(a["documents"], key=lambda d: d["rank"])
    assert best["name"] == "doc2"  # "alice lives in paris" supports the answer


def test_export_zip_holds_viewer_and_parquet(client, run):
    rid, _ = run
    r = client.get(f"/api/runs/{rid}/export", headers=H)
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    root = f"attnflow-run-{rid}/"
    assert root + "html/index.html" in names and root + "parquet/manifest.json" in names
    assert any(n.startswith(root + "parquet/attributions/") for n in names)


# ----------------------------------------------------------------------------- security
def test_missing_or_wrong_token_is_403(client, run):
    rid, _ = run
    for headers in ({}, {"x-attnflow-token": "wrong"}, {"x-attnflow-token": TOKEN[:-1]}):
        assert client.get("/api/models", headers=headers).status_code == 403
        assert client.get(f"/api/runs/{rid}/graph", headers=headers).status_code == 403
        assert client.post("/api/runs", json={"prompt": "x"}, headers=headers).status_code == 403
    assert client.get("/api/models", headers=H).status_code == 200


def test_foreign_host_is_400(client):
    for host in ("evil.example", "evil.example:8765", "127.0.0.1.evil.example", "attacker.localhost.evil"):
        assert client.get("/api/models", headers={**H, "host": host}).status_code == 400
        assert client.get("/", headers={"host": host}).status_code == 400
    assert client.get("/api/models", headers={**H, "host": "localhost:8765"}).status_code == 200


def test_foreign_origin_is_403(client):
    for origin in ("http://evil.example", "http://127.0.0.1:9999", "null", "https://localhost:8765"):
        r = client.get("/api/models", headers={**H, "origin": origin})
        assert r.status_code == 403
    assert client.get("/api/models", headers={**H, "sec-fetch-site": "cross-site"}).status_code == 403
    ok = client.get("/api/models", headers={**H, "origin": BASE})
    assert ok.status_code == 200
    assert not [k for k in ok.headers if k.lower().startswith("access-control-")]  # no CORS, ever


def test_path_or_hub_id_as_model_is_400(client):
    for name in ("/etc", "../demo", str(af.demo.MODEL_DIR), "HuggingFaceTB/SmolLM2-135M", "", 3):
        r = client.post("/api/runs", json={"model": name, "prompt": PROMPT}, headers=H)
        assert r.status_code == 400 and "unknown model" in r.json()["error"]


def asgi_get(app, path: str, raw: bytes) -> int:
    """Send a path to the app exactly as given (httpx would normalise `..`)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": raw, "query_string": b"", "root_path": "", "server": ("127.0.0.1", 8765),
             "client": ("127.0.0.1", 5555), "headers": [(b"host", b"127.0.0.1:8765"), (b"x-attnflow-token", TOKEN.encode())]}
    status = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])

    asyncio.run(app(scope, receive, send))
    return status[0]


@pytest.mark.parametrize("path", ["/../pyproject.toml", "/../../etc/passwd", "/static/../app.py",
                                  "/explorer.js/../app.py", "/%2e%2e%2fapp.py", "/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
                                  "/app.py", "/runs.py", "/static/explorer.js", "/index.html"])
def test_traversal_and_unknown_static_paths_are_404(app, client, path):
    from urllib.parse import unquote

    assert asgi_get(app, unquote(path), path.encode()) == 404
    assert asgi_get(app, path, path.encode()) == 404
    assert client.get(path).status_code == 404


def test_static_files_by_fixed_name_with_csp(client):
    for path in ("/", "/explorer.js", "/explorer.css"):
        r = client.get(path)
        assert r.status_code == 200
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"


def test_body_over_the_cap_is_413(client):
    big = json.dumps({"model": "demo", "prompt": "a " * (1 << 20)})  # 2 MiB
    assert client.post("/api/runs", content=big, headers={**H, "content-type": "application/json"}).status_code == 413

    def chunks():  # no content-length: counted as it arrives
        for _ in range(64):
            yield b" " * (1 << 15)

    assert client.post("/api/runs", content=chunks(), headers=H).status_code == 413


def test_prompt_over_the_token_limit_is_refused_with_its_size(client, app):
    r = client.post("/api/runs", json={"model": "demo", "prompt": "alice " * 200, "max_new_tokens": 3}, headers=H)
    assert r.status_code == 400
    msg = r.json()["error"]
    assert "201 tokens" in msg and "at most 120" in msg


def test_bad_requests_are_400(client):
    for body in ({"prompt": ""}, {"prompt": PROMPT, "max_new_tokens": 0}, {"prompt": PROMPT, "max_new_tokens": 10**6},
                 {"prompt": PROMPT, "documents": "doc"}, {"messages": [{"role": "user", "content": "hi"}]}, [1, 2]):
        assert client.post("/api/runs", json=body, headers=H).status_code == 400, body
    assert client.post("/api/runs", content=b"{not json", headers=H).status_code == 400
    assert client.get("/api/runs/nope/graph", headers=H).status_code == 404


def test_fifth_queued_run_is_429(model):
    app = create_app({"demo": lambda: model}, TOKEN, limits=Limits(max_queued=4))
    client = TestClient(app, base_url=BASE)
    gate = threading.Event()
    runner = app.state.runner
    runner.execute = lambda run: gate.wait(30)  # runs stay queued / running until released
    try:
        ids = [start_run(client) for _ in range(4)]
        r = client.post("/api/runs", json={"model": "demo", "prompt": PROMPT}, headers=H)
        assert r.status_code == 429 and "at most 4" in r.json()["error"]
    finally:
        gate.set()
    for rid in ids:
        assert runner.get(rid).wait(30)
    assert client.post("/api/runs", json={"model": "demo", "prompt": PROMPT}, headers=H).status_code == 202


def test_prompts_are_not_logged(client, caplog, capfd):
    marker = "zebra-secret-marker"
    with caplog.at_level(logging.DEBUG):
        rid = start_run(client, prompt=f"question : {marker} ?")
        events(client, rid)
    out, err = capfd.readouterr()
    assert marker not in caplog.text and marker not in out and marker not in err


def test_app_works_when_nnsight_was_imported_first():
    """nnsight adds `save` to every object, which breaks anyio classes defined later (outside pytest's anyio plugin)."""
    import subprocess
    import sys

    code = (
        "import nnsight\n"
        "from starlette.testclient import TestClient\n"
        "from attnflow.explorer.app import create_app\n"
        f"app = create_app({{'demo': lambda: None}}, {TOKEN!r})\n"
        f"r = TestClient(app, base_url={BASE!r}).get('/api/models', headers={H!r})\n"
        "assert r.status_code == 200, r.text\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


# ----------------------------------------------------------------------------- gold marks, token text
GOLD_DOCS = [{"name": "doc1", "text": "bob owns a cat .", "supporting": False},
             {"name": "doc2", "text": "alice lives in paris .", "gold": True}]


def test_gold_documents_are_marked_in_the_run_attribution_and_export(client, tmp_path):
    from test_html import page_data

    rid = start_run(client, documents=GOLD_DOCS)
    assert events(client, rid)[-1][0] == "done"
    info = client.get(f"/api/runs/{rid}", headers=H).json()
    assert info["gold"] == [1] and info["spans"][1]["name"] == "doc2"
    a = client.get(f"/api/runs/{rid}/attribution", headers=H).json()
    assert {d["name"]: d["gold"] for d in a["documents"]} == {"doc1": False, "doc2": True}
    r = client.get(f"/api/runs/{rid}/export", headers=H)
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(tmp_path)
    meta = page_data(tmp_path / f"attnflow-run-{rid}" / "html")
    assert meta["examples"][0]["gold"] == [1]
    plain = client.get(f"/api/runs/{start_run(client)}", headers=H)  # no flags: nothing marked
    assert plain.status_code == 200


def test_a_gold_flag_that_is_no_boolean_is_400(client):
    docs = [{"name": "doc1", "text": "bob owns a cat .", "gold": "yes"}]
    r = client.post("/api/runs", json={"model": "demo", "prompt": PROMPT, "documents": docs}, headers=H)
    assert r.status_code == 400 and "boolean" in r.json()["error"]


def test_byte_level_tokens_are_sent_as_the_text_they_cover():
    """A byte-level BPE model: `text` spells the prompt exactly ("Ramírez", "–"), `tokens` keeps the raw strings."""
    import nnsight
    from test_tokens import TEXT, byte_bpe
    from tiny_models import tiny_model

    from attnflow.tokens import PARTIAL, text_of

    tok = byte_bpe()
    lm = nnsight.TransformersModel(tiny_model("llama", vocab_size=len(tok), max_position_embeddings=256), tokenizer=tok)
    client = TestClient(create_app({"bpe": lambda: lm}, TOKEN, limits=Limits(max_tokens=200)), base_url=BASE)
    doc = "\u00c9dgar Ram\u00edrez met Abdul"
    r = client.post("/api/runs", json={"model": "bpe", "prompt": TEXT, "max_new_tokens": 6,
                                       "documents": [{"name": "d", "text": doc, "gold": True}]}, headers=H)
    assert r.status_code == 202, r.text
    evs = events(client, r.json()["id"])
    assert evs[-1][0] == "done", evs
    info = client.get(f"/api/runs/{r.json()['id']}", headers=H).json()
    n, ids = info["prompt_length"], tok.convert_tokens_to_ids(info["tokens"])
    assert info["tokens"] == tok.convert_ids_to_tokens(ids) and any("\u0120" in t or "\u00c3" in t for t in info["tokens"])
    special = [i in tok.all_special_ids for i in ids[:n]]
    assert text_of(info["text"][:n], special) == f"d : {doc}\n{TEXT}"
    s = info["spans"][0]
    assert text_of(info["text"][s["start"]:s["end"]]).strip() == doc and info["gold"] == [0]
    completion = tok.decode(ids[n:]).rstrip("\ufffd")
    assert "".join(t for t in info["text"][n:] if t != PARTIAL) == completion
    streamed = [d["text"] for e, d in evs if e == "token"]
    # (a random model emits invalid UTF-8 too; the stream, decoded over a window, may mark it differently)
    assert len(streamed) == len(ids) - n
    assert "".join(t for t in streamed if t != PARTIAL).replace("\ufffd", "") == completion.replace("\ufffd", "")
