"""HTML export without a browser: shard layout and sizes, decoded weights, escaping, CSP, CLI, inline view."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from attnflow.cli import main as cli_main
from attnflow.errors import BadArgumentError
from attnflow.exporters import inline_html, to_html, to_parquet
from attnflow.exporters.html import plan
from attnflow.attention_trace import Span

from test_parquet import attribution_rows, make_trace

B85_CHARS = r"[0-9A-Za-z!#$%.()*+\-;,=:?@^_\]{|}~]*"  # html.B85: no quote, backslash, <, > or &
SHARD = re.compile(rf'^attnflowShard\((\{{.*?\}}),"({B85_CHARS})","({B85_CHARS})"\);\n$', re.S)


def b85decode(text: str) -> bytes:
    """The shards' base85, decoded by the standard library's RFC 1924 decoder (html.B85 swaps 4 of its digits)."""
    return base64.b85decode(text.translate(str.maketrans(".,:]", "&<>`")))


def page_data(out: Path) -> dict:
    text = (out / "index.html").read_text()
    m = re.search(r'<script type="application/json" id="attnflow-data">(.*?)</script>', text, re.S)
    return json.loads(m.group(1))


def decode(out: Path, meta: dict) -> dict:
    """{(kind, example, layer or method, head): {query: weights}} from every shard file, decoded independently."""
    got = {}
    for entry in meta["shards"]:
        m = SHARD.match((out / "shards" / f"{entry['id']}.js").read_text())
        header = json.loads(m.group(1))
        assert {k: v for k, v in header.items() if k != "enc"} == entry
        ex = meta["examples"][header["example"]]
        what = header.get("layer", header.get("method"))
        info = ex["flow"][what] if header["kind"] == "flow" else {"rows": ex["rows"], "causal": meta["causal"]}
        rows = info["rows"][header["r0"] : header["r1"]]
        widths = [q + 1 if info["causal"] else ex["length"] for q in rows]
        raw = b85decode(m.group(2))
        codes = np.frombuffer(raw, "<f2").astype(np.float64) if header["enc"] == "float16" else np.frombuffer(raw, np.uint8) / 255
        scales = np.frombuffer(b85decode(m.group(3)), "<f4").reshape(len(header["heads"]), len(rows))
        codes = codes.reshape(len(header["heads"]), sum(widths))
        for i, h in enumerate(header["heads"]):
            start = 0
            for r, (q, w) in enumerate(zip(rows, widths)):
                got.setdefault((header["kind"], header["example"], what, h), {})[q] = codes[i, start : start + w] * scales[i, r]
                start += w
    return got


@pytest.mark.parametrize("precision,tol", [("uint8", 1 / 510), ("float16", 2**-11)])
def test_shards_decode_to_the_weights(tmp_path, precision, tol):
    tr = make_trace([40, 23], layers=(0, 2), heads=5, rows=[list(range(40)), [0, 5, 22]], dtype=torch.float16)
    out = to_html(tr, tmp_path / "view", shard_bytes=4096, precision=precision)
    meta = page_data(out)
    got = decode(out, meta)
    assert len(meta["shards"]) > 2 * 2  # split beyond one file per example x layer
    for b in range(2):
        P, qs = tr.example_patterns(b)
        for li in range(2):
            for h in range(5):
                rows = got[("attn", b, li, h)]
                assert sorted(rows) == qs.tolist()
                for j, q in enumerate(qs.tolist()):
                    ref = P[li, h, j, : q + 1].double().numpy()
                    assert len(rows[q]) == q + 1
                    assert np.abs(rows[q] - ref).max() <= ref.max() * tol + 1e-7
    for f in (out / "shards").iterdir():
        assert f.stat().st_size <= 4096


def test_shard_plan_prefers_head_groups_then_rows():
    widths = list(range(1, 101))  # 5050 values per head
    assert plan(widths, 16, 10**6, 1) == [(0, 8, 0, 100), (8, 16, 0, 100)]
    groups = plan(widths, 16, 4 * 5050 * 4 // 3 + 4000, 1)
    assert {h1 - h0 for h0, h1, _, _ in groups} == {4} and all((r0, r1) == (0, 100) for _, _, r0, r1 in groups)
    chunks = plan(widths, 2, 5000, 1)
    assert {(h0, h1) for h0, h1, _, _ in chunks} == {(0, 1), (1, 2)}
    assert [c[2:] for c in chunks if c[0] == 0][0][0] == 0 and chunks[-1][3] == 100
    with pytest.raises(BadArgumentError, match="cannot hold one row"):
        plan([10**6], 1, 5000, 1)


def test_default_shards_one_file_per_layer_and_group(tmp_path):
    tr = make_trace([12, 7], layers=(0, 1, 2), heads=12)
    meta = page_data(to_html(tr, tmp_path / "view"))
    heads = sorted({tuple(s["heads"]) for s in meta["shards"]})
    assert heads == [tuple(range(0, 8)), tuple(range(8, 12))]
    assert len(meta["shards"]) == 2 * 3 * 2


def test_flow_and_attributions_embedded(tmp_path):
    tr = make_trace([6, 4], heads=2)
    F = tr.patterns.float().mean((1, 2))
    T, Tq = F[:, -1:], tr.query_positions[:, -1:]
    odd = "../last </script>"  # a method name is data, never part of a path or markup
    out = to_html(tr, tmp_path / "view", flow={"raw": F, odd: (T, Tq)}, attributions=pa.table(attribution_rows()))
    meta = page_data(out)
    assert meta["flow_methods"] == ["raw", odd]
    assert meta["examples"][1]["flow"][odd] == {"rows": [3], "causal": True}
    assert sorted(p.name for p in (out / "shards").glob("*-f1-*")) == ["e0-f1-h0-0-r0-1.js", "e1-f1-h0-0-r0-1.js"]
    got = decode(out, meta)
    for b, n in enumerate([6, 4]):
        pad = 6 - n
        for q in range(n):
            ref = F[b, pad + q, pad : pad + q + 1].double().numpy()
            assert np.abs(got[("flow", b, "raw", 0)][q] - ref).max() <= ref.max() / 510 + 1e-7
    assert meta["attributions"]["score"] == pytest.approx([0.75, 0.25, 1.0])


def test_markup_in_tokens_cannot_leave_the_json(tmp_path):
    tr = make_trace([5], heads=1)
    tr.tokens[0][:4] = ["</script><script>alert(1)</script>", "<img src=x onerror=alert(1)>", "a\u2028b&c", "<!--"]
    tr.spans[0] = [Span("</script>", "document", 0, 2)]
    tr.model_info["name"] = "<b>model</b>"
    out = to_html(tr, tmp_path / "view")
    text = (out / "index.html").read_text()
    assert text.count("</script>") == 2 and "<img" not in text and "<!--" not in text and "\u2028" not in text
    assert "<title>attnflow: &lt;b&gt;model&lt;/b&gt;</title>" in text
    meta = page_data(out)
    assert meta["examples"][0]["tokens"][:4] == tr.tokens[0][:4]
    assert meta["examples"][0]["spans"][0]["name"] == "</script>"


def test_self_contained_and_csp(tmp_path):
    tr = make_trace([5], heads=1)
    out = to_html(tr, tmp_path / "view")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files[:2] == ["index.html", "shards/e0-l0-h0-0-r0-5.js"] and files[-2:] == ["viewer.css", "viewer.js"]
    text = (out / "index.html").read_text()
    assert re.search(r'<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; script-src \'self\' file:;', text)
    for f in ("index.html", "viewer.js", "viewer.css"):
        body = (out / f).read_text()
        assert not re.search(r"https?://|//cdn|@import|url\(", body), f
    js = (out / "viewer.js").read_text()
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "eval(" not in js and "fetch(" not in js
    assert (out / "index.html").stat().st_mode & 0o044  # readable beyond the owner, so it can be served


def test_output_replaced_atomically_and_bad_arguments(tmp_path):
    out = tmp_path / "view"
    to_html(make_trace([5, 4], layers=(0, 1, 2)), out)
    with pytest.raises(BadArgumentError, match="precision"):
        to_html(make_trace([5]), out, precision="int4")
    with pytest.raises(BadArgumentError, match="shard_bytes"):
        to_html(make_trace([5]), out, shard_bytes=100)
    assert len(page_data(out)["shards"]) == 6
    to_html(make_trace([5], layers=(0,)), out, overwrite=True)  # issue 17: replacing needs overwrite=True
    assert len(list((out / "shards").iterdir())) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["view"]


def test_render_command(tmp_path, capsys):
    tr = make_trace([6, 4], heads=2)
    F = tr.patterns.float().mean((1, 2))
    to_parquet(tr, tmp_path / "run", flow={"raw": F}, attributions=pa.table(attribution_rows()))
    assert cli_main(["render", str(tmp_path / "run"), "--out", str(tmp_path / "view"), "--shard-bytes", "8192"]) == 0
    assert "index.html" in capsys.readouterr().out
    meta = page_data(tmp_path / "view")
    assert meta["flow_methods"] == ["raw"] and meta["attributions"]["rank"] == [1, 2, 1]
    assert meta["examples"][0]["tokens"] == tr.tokens[0]
    assert cli_main(["render", str(tmp_path / "missing"), "--out", str(tmp_path / "v2")]) == 2
    assert "no saved trace" in capsys.readouterr().err
    assert cli_main(["render", str(tmp_path / "run"), "--out", str(tmp_path / "v2"), "--shard-bytes", "10"]) == 2
    assert "shard_bytes=10 is too small" in capsys.readouterr().err and not (tmp_path / "v2").exists()


def test_inline_html_small_and_refused(monkeypatch):
    tr = make_trace([5, 3], heads=2)
    tr.tokens[0][0] = "</script><script>alert(1)</script>"
    out = tr._repr_html_()
    assert out.startswith("<iframe") and out.count("<script") == 0  # everything sits escaped in srcdoc
    doc = html.unescape(re.search(r'srcdoc="([^"]*)"', out).group(1))  # the fallback text follows
    assert "script-src 'unsafe-inline'" in doc and '<script src=' not in doc
    meta = json.loads(re.search(r'id="attnflow-data">(.*?)</script>', doc, re.S).group(1))
    assert meta["examples"][0]["tokens"][0] == tr.tokens[0][0] and len(meta["inline"]) == len(meta["shards"])
    assert [s["kind"] for s in meta["shards"]].count("attn") == 4  # and the default rollout rows:
    assert meta["flow_methods"] == ["rollout"] and meta["flow_info"]["rollout"]["alpha"] == 0.5
    import attnflow.exporters.html as h

    monkeypatch.setattr(h, "INLINE_LIMIT", 100)
    msg = inline_html(tr)
    assert "too large to show inline" in msg and "to_html" in msg and "<iframe" not in msg


def test_named_flow_methods_include_maxflow(tmp_path, monkeypatch):
    """flow=["rollout", "maxflow"]: the rows behind each example's completion, composed in Python, in the selector."""
    from attnflow.flow import max_flow, rollout

    tr = make_trace([12, 9], layers=(0, 1, 2, 3), heads=2, seed=5)  # left-padded; completion: the last 2 tokens
    out = to_html(tr, tmp_path / "view", flow=["rollout", "maxflow"])
    meta = page_data(out)
    assert meta["flow_methods"] == ["rollout", "maxflow"]
    assert "Abnar" in meta["flow_info"]["maxflow"]["what"] and meta["flow_info"]["rollout"]["alpha"] == 0.5
    got = decode(out, meta)
    for b, n in enumerate([12, 9]):
        P, _ = tr.example_patterns(b)  # [layer, head, query, key], unpadded
        assert meta["examples"][b]["flow"]["maxflow"]["rows"] == [n - 3, n - 2]  # rows that produced tokens n-2, n-1
        for name, ref in (("maxflow", max_flow(P[None].double(), rows=[n - 3, n - 2])[0]),  # [rows, key]
                          ("rollout", rollout(P[None].double(), rows=[n - 3, n - 2])[0])):
            for j, q in enumerate([n - 3, n - 2]):
                row = got[("flow", b, name, 0)][q]
                assert len(row) == q + 1 and np.abs(row - ref[j, : q + 1].numpy()).max() <= float(ref[j].max()) / 510 + 1e-7
                assert abs(row.sum() - 1) < 0.02  # shares
    with pytest.raises(BadArgumentError, match="target_flow"):
        import attnflow.exporters.html as h

        monkeypatch.setattr(h, "MAXFLOW_TOKENS", 10)
        to_html(tr, tmp_path / "v2", flow=["maxflow"])  # example 0 has 12 tokens
    assert not (tmp_path / "v2").exists()
    with pytest.raises(BadArgumentError, match="every layer"):
        to_html(make_trace([6], layers=(0, 1)), tmp_path / "v3", flow=["maxflow"])  # 2 of the model's 4 layers
    with pytest.raises(BadArgumentError, match="method='nope'"):
        to_html(tr, tmp_path / "v4", flow=["nope"])
    with pytest.raises(BadArgumentError, match="in a list"):
        to_html(tr, tmp_path / "v5", flow="maxflow")
