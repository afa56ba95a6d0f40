"""The HTML viewer in headless Chromium: hover intensities, layer/head switching, freezing, XSS, network.

Needs Debian's browser: `apt-get install -y chromium chromium-driver` (CI installs it).
Set ATTNFLOW_SCREENSHOT=docs/viewer.png to write the README screenshot there (else it goes to a temporary dir).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from attnflow.exporters import inline_html, to_html
from attnflow.attention_trace import AttentionTrace, Span

import browser_util
from browser_util import set_mode, wait_ready
from test_parquet import make_trace

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not browser_util.available(),
        reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
    ),
]

PAYLOADS = [
    '<img src=x onerror="window.__pwned=1">',
    "</script><script>window.__pwned=2</script>",
    "<svg onload=\"window.__pwned=3\"></svg>",
]
READ_TOKENS = """
return Array.from(document.querySelectorAll('#tokens .tok')).map(t =>
  [+t.dataset.pos, t.dataset.w === undefined ? null : t.dataset.w.split(' ').map(Number),
   t.dataset.i === undefined ? null : t.dataset.i.split(' ').map(Number), t.textContent]);
"""


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def driver():
    d = browser_util.driver(1400, 1000)
    yield d
    d.quit()


@pytest.fixture(autouse=True)
def clean_console(driver, request):
    """Every test ends with no console error and no network request (file:// loads only)."""
    yield
    if "served" in request.fixturenames:  # that test loads over loopback http and checks its own requests
        driver.get_log("performance")
        return
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    requests = []  # (url, document that asked)
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            requests.append((msg["params"]["request"]["url"], msg["params"].get("documentURL", "")))
    ours = [u for u, doc in requests if doc.startswith(("file://", "about:srcdoc"))]
    assert ours and [u for u in ours if not u.startswith("file://")] == []
    assert [u for u, _ in requests if u.startswith(("http:", "https:", "ws:", "wss:", "ftp:"))] == []


def story_trace() -> tuple[AttentionTrace, torch.Tensor]:
    """Two examples with markup and tokenizer markers in the text, and a causal flow [batch, query, key]."""
    tr = make_trace([14, 9], layers=(0, 3, 5), heads=4, seed=7)
    tr.tokens[0][:9] = ["<s>", "Ġthe", "Ġcat", "Ċ", "▁sat", "<0x0A>", PAYLOADS[0], PAYLOADS[1], PAYLOADS[2]]
    tr.spans[0] = [Span("doc <b>1</b>", "document", 1, 6), Span(PAYLOADS[0], "document", 6, 9), Span("q", "question", 9, 11)]
    tr.model_info = {"name": PAYLOADS[2], "num_layers": 6, "num_heads": 4}
    F = tr.patterns.float().mean(2).cumsum(1)[:, -1]  # any causal matrix with unequal rows
    return tr, F


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    tr, F = story_trace()
    scores = pa.table(
        {
            "example": [0, 0, 0], "method": ["rollout"] * 3, "target": [12, 12, 12],
            "source_span": [0, 1, 2], "score": [0.5, 0.125, 0.375], "rank": [1, 3, 2],
        }
    )
    out = to_html(tr, tmp_path_factory.mktemp("story") / "view", flow={"rollout": F}, attributions=scores)
    return tr, F, out


def open_page(driver, path: Path):
    driver.get(path.as_uri())
    wait_ready(driver)
    assert driver.execute_script("return window.__pwned") is None


def hover(driver, panel: str, pos: int):
    return browser_util.hover(driver, panel, pos)


def double_click(driver, panel: str, pos: int):
    browser_util.double_click(driver, panel, pos)


def keys(driver, text: str):
    driver.execute_script("document.activeElement && document.activeElement.blur()")
    ActionChains(driver).send_keys(text).perform()
    wait_ready(driver)


class Shown(dict):
    """{position: (weights, intensities, text)} of the token pane, and the keys left out of the colour scale."""

    excluded: set


def tokens(driver, panel: str) -> Shown:
    set_mode(driver, panel)
    out = Shown({p: (w, i, text) for p, w, i, text in driver.execute_script(READ_TOKENS)})
    out.excluded = {int(p) for p in driver.execute_script("return document.getElementById('app').dataset.excluded").split()}
    return out


def panel_attr(driver, panel: str, name: str) -> str:
    return driver.execute_script(f"return document.getElementById('{panel}').dataset.{name}")


# ----------------------------------------------------------------------------- checks
def check_row(shown: Shown, ref_rows: list[torch.Tensor], gamma=1.0, threshold=0.0, tol=None):
    """Displayed weights of one hovered row equal `ref_rows` (one per series) within the uint8 step.

    Each stored row is quantised against its own max, so the step is max/255 (error max/510).
    Colours scale to the largest weight outside the keys left out of the scale (sinks), capped at 1.
    """
    n = len(ref_rows[0])
    for p, (w, i, _) in shown.items():
        if p >= n:
            assert w is None, p
            continue
        assert len(w) == len(ref_rows)
        for s, ref in enumerate(ref_rows):
            step = float(ref.max()) / 510 if tol is None else tol
            assert abs(w[s] - float(ref[p])) <= step + 1e-5, (p, s, w[s], float(ref[p]))
    for s in range(len(ref_rows)):
        top = max(w[s] for p, (w, _, _) in shown.items() if w is not None and p not in shown.excluded)
        for p, (w, i, _) in shown.items():
            if w is not None:
                expect = 0.0 if w[s] < threshold else min(1.0, (w[s] / top) ** gamma)
                assert abs(i[s] - expect) <= 1e-4, (p, s, i[s], expect)


def test_text_markers_roles_spans_and_settings(driver, story):
    tr, _, out = story
    open_page(driver, out / "index.html")
    shown = tokens(driver, "observer")
    texts = [shown[p][2] for p in range(14)]
    assert texts[:9] == ["<s>", " the", " cat", "\u21b5\n", " sat", "\u21b5\n", *PAYLOADS]
    assert driver.find_elements(By.CSS_SELECTOR, "#app img, #app svg, #app script") == []
    assert shown.excluded == {0}  # "<s>" at position 0 is a sink: out of the colour scale by default
    names = [e.get_attribute("textContent") for e in driver.find_elements(By.CSS_SELECTOR, "#tokens .span-name")]
    assert names == ["doc <b>1</b>", PAYLOADS[0], "q"]
    roles = driver.execute_script(
        "return Array.from(document.querySelectorAll('#tokens .tok')).map(t => t.classList.contains('completion'))"
    )
    assert roles == [p >= tr.prompt_lengths[0] for p in range(14)]
    info = driver.find_element(By.ID, "info").get_attribute("textContent")
    assert "settings.max_new_tokens" in info and PAYLOADS[2] in info
    assert driver.title == "attnflow: " + PAYLOADS[2]
    assert driver.execute_script("return window.__pwned") is None


def test_hover_switch_layers_and_heads(driver, story):
    tr, _, out = story
    open_page(driver, out / "index.html")
    P, _ = tr.example_patterns(0)  # [layer, head, query, key], every row recorded
    hover(driver, "observer", 10)
    check_row(tokens(driver, "observer"), [P[0, 0, 10, :11]])
    keys(driver, "jl")  # next layer, next head
    assert driver.execute_script("const a = document.getElementById('app'); return [a.dataset.layer, a.dataset.heads]") == ["3", "1"]
    hover(driver, "observer", 12)
    check_row(tokens(driver, "observer"), [P[1, 1, 12, :13]])

    Select(driver.find_element(By.ID, "layer")).select_by_visible_text("layer 5")
    wait_ready(driver)
    head3 = driver.find_element(By.CSS_SELECTOR, 'button.head[data-head="3"]')
    ActionChains(driver).key_down(Keys.SHIFT).click(head3).key_up(Keys.SHIFT).perform()  # overlay heads 1 and 3
    wait_ready(driver)
    assert driver.execute_script("return document.getElementById('app').dataset.heads") == "1 3"
    hover(driver, "observer", 7)
    check_row(tokens(driver, "observer"), [P[2, 1, 7, :8], P[2, 3, 7, :8]])
    keys(driver, "m")  # mean over every head
    hover(driver, "observer", 13)
    rows = P[2, :, 13, :14]  # each head's row is quantised against its own max
    check_row(tokens(driver, "observer"), [rows.mean(0)], tol=float(rows.amax(-1).mean()) / 510)
    keys(driver, "kh")  # previous layer, previous head (from the mean: head 3)
    assert driver.execute_script("const a = document.getElementById('app'); return [a.dataset.layer, a.dataset.heads]") == ["3", "3"]


def test_observed_view_gamma_and_threshold(driver, story):
    tr, _, out = story
    open_page(driver, out / "index.html")
    P, _ = tr.example_patterns(0)
    hover(driver, "observed", 4)
    shown = tokens(driver, "observed")
    for p, (w, i, _) in shown.items():
        if p < 4:
            assert w is None
        else:  # who attended to token 4: column 4 of every later row
            assert abs(w[0] - float(P[0, 0, p, 4])) <= float(P[0, 0, p].max()) / 510 + 1e-5
    driver.execute_script(
        "for (const [id, v] of [['gamma', '0.5'], ['threshold', '0.05']]) {"
        " const e = document.getElementById(id); e.value = v; e.dispatchEvent(new Event('input')); }"
    )
    hover(driver, "observer", 11)
    check_row(tokens(driver, "observer"), [P[0, 0, 11, :12]], gamma=0.5, threshold=0.05)
    assert all(w is None for w, _, _ in tokens(driver, "observed").values())  # unfrozen: cleared when left


def test_freeze_each_view_independently(driver, story):
    _, _, out = story
    open_page(driver, out / "index.html")
    double_click(driver, "observer", 5)
    assert panel_attr(driver, "observer", "frozen") == "true" and panel_attr(driver, "observer", "focus") == "5"
    hover(driver, "observer", 9)
    assert panel_attr(driver, "observer", "focus") == "5"
    hover(driver, "observed", 2)  # the other view still follows the mouse
    assert panel_attr(driver, "observed", "focus") == "2" and panel_attr(driver, "observed", "frozen") == "false"
    double_click(driver, "observed", 3)
    hover(driver, "observed", 8)
    assert panel_attr(driver, "observed", "focus") == "3" and panel_attr(driver, "observed", "frozen") == "true"
    keys(driver, "j")  # a frozen view follows layer changes
    assert tokens(driver, "observer")[5][1] is not None and panel_attr(driver, "observer", "focus") == "5"
    double_click(driver, "observer", 6)
    assert panel_attr(driver, "observer", "frozen") == "false"
    hover(driver, "observer", 9)
    assert panel_attr(driver, "observer", "focus") == "9"
    assert panel_attr(driver, "observed", "focus") == "3" and panel_attr(driver, "observed", "frozen") == "true"
    double_click(driver, "observed", 3)
    hover(driver, "observed", 8)
    assert panel_attr(driver, "observed", "focus") == "8" and panel_attr(driver, "observed", "frozen") == "false"


def test_flow_view_bars_and_example_picker(driver, story):
    tr, F, out = story
    open_page(driver, out / "index.html")
    hover(driver, "flow", 12)  # token 12 is produced by row 11
    check_row(tokens(driver, "flow"), [F[0, 11, :12]])
    bars = driver.execute_script(
        "return Array.from(document.querySelectorAll('#bars .bar-row')).map(b => +b.dataset.score)"
    )
    assert bars == pytest.approx([0.5, 0.125, 0.375])  # the attributions table for target 12
    hover(driver, "flow", 8)  # no attribution rows: shares of the flow row per span
    row = F[0, 7, :8].double()
    want = [float(row[1:6].sum() / row.sum()), float(row[6:8].sum() / row.sum()), 0.0]
    got = driver.execute_script("return Array.from(document.querySelectorAll('#bars .bar-row')).map(b => +b.dataset.score)")
    assert got == pytest.approx(want, abs=3e-3)

    Select(driver.find_element(By.ID, "example")).select_by_index(1)
    wait_ready(driver)
    assert len(tokens(driver, "observer")) == 9
    P1, _ = tr.example_patterns(1)  # unpadded: the viewer must drop example 1's 5 pad positions
    hover(driver, "observer", 6)
    check_row(tokens(driver, "observer"), [P1[0, 0, 6, :7]])
    hover(driver, "flow", 5)
    check_row(tokens(driver, "flow"), [F[1, 5 + 4, 5:10]])


def test_maxflow_in_the_method_selector(driver, tmp_path):
    from attnflow.flow import max_flow

    tr = make_trace([12, 9], layers=(0, 1, 2, 3), heads=2, seed=5)  # every layer of the model; completion: 2 tokens
    out = to_html(tr, tmp_path / "view", flow=["rollout", "maxflow"])
    open_page(driver, out / "index.html")
    method = Select(driver.find_element(By.ID, "method"))
    assert [o.text for o in method.options] == ["rollout", "maxflow"]
    assert "Abnar" in method.options[1].get_attribute("title")
    method.select_by_value("maxflow")
    wait_ready(driver)
    for b, n in enumerate([12, 9]):
        if b:
            Select(driver.find_element(By.ID, "example")).select_by_index(1)
            wait_ready(driver)
        P, _ = tr.example_patterns(b)
        hover(driver, "flow", n - 1)  # the last token, produced by row n - 2
        check_row(tokens(driver, "flow"), [max_flow(P[None].double(), rows=[n - 2])[0, 0, : n - 1]])  # keys 0..n-2
        assert f"maxflow row {n - 2}" in driver.find_element(By.ID, "caption").text


def test_attributions_without_flow(driver, tmp_path):
    tr, _ = story_trace()
    scores = pa.table(
        {
            "example": [0] * 6, "method": ["flow"] * 6, "target": [12, 12, 12, -1, -1, -1],
            "source_span": [0, 1, 2, 0, 1, 2], "score": [0.2, 0.6, 0.2, 0.1, 0.3, 0.6], "rank": [2, 1, 3, 3, 2, 1],
        }
    )
    out = to_html(tr, tmp_path / "view", attributions=scores)
    open_page(driver, out / "index.html")
    read_bars = "return Array.from(document.querySelectorAll('#bars .bar-row')).map(b => +b.dataset.score)"
    assert driver.execute_script(read_bars) == pytest.approx([0.1, 0.3, 0.6])  # nothing hovered: all targets
    hover(driver, "flow", 12)
    assert driver.execute_script(read_bars) == pytest.approx([0.2, 0.6, 0.2])
    shown = tokens(driver, "flow")  # tokens shaded by their span's score, outside spans nothing
    assert [shown[p][0] for p in (0, 1, 5, 6, 8, 9, 10, 11)] == [None, [0.2], [0.2], [0.6], [0.6], [0.2], [0.2], None]
    assert shown[6][1] == [1.0] and shown[1][1] == pytest.approx([1 / 3], abs=1e-4)


def test_split_shards_float16_and_missing_rows(driver, tmp_path):
    tr = make_trace([150], layers=(0, 1), heads=3, rows=[list(range(0, 150, 3))], seed=11)
    out = to_html(tr, tmp_path / "view", shard_bytes=4096, precision="float16")
    assert len(list((out / "shards").iterdir())) > 12
    open_page(driver, out / "index.html")
    P, qs = tr.example_patterns(0)
    j = qs.tolist().index(147)
    hover(driver, "observer", 147)
    shown = tokens(driver, "observer")
    for p in range(148):
        assert abs(shown[p][0][0] - float(P[0, 0, j, p])) <= float(P[0, 0, j].max()) * 2**-11 + 1e-6
    hover(driver, "observer", 146)  # no recorded row: nothing shown
    assert all(w is None for w, _, _ in tokens(driver, "observer").values())
    hover(driver, "observed", 2)  # rows 3, 6, ... 147 from every row chunk
    shown = tokens(driver, "observed")
    assert [p for p, v in shown.items() if v[0] is not None] == [q for q in qs.tolist() if q >= 2]
    for jj, q in enumerate(qs.tolist()):
        if q >= 2:
            assert abs(shown[q][0][0] - float(P[0, 0, jj, 2])) <= float(P[0, 0, jj].max()) * 2**-11 + 1e-6


def test_reduced_heads_of_a_non_causal_trace(driver, tmp_path):
    """An encoder-style trace: every row attends to every real key; one reduced head ("mean")."""
    g = torch.Generator().manual_seed(5)
    lengths, S = [6, 4], 6
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    logits = torch.randn(2, 2, 1, S, S, generator=g).masked_fill(mask.view(2, 1, 1, 1, S) == 0, float("-inf"))
    patterns = (logits.softmax(-1) * mask.view(2, 1, 1, S, 1)).nan_to_num()  # pad rows and keys zero
    qpos = torch.where(mask == 1, torch.arange(S), torch.tensor(-1))
    tr = AttentionTrace(
        patterns=patterns, input_ids=mask * 7, attention_mask=mask, query_positions=qpos,
        tokens=[[f"w{p}" for p in range(n)] for n in lengths], prompt_lengths=lengths, layers=[0, 1], heads="mean",
    )
    out = to_html(tr, tmp_path / "view")
    open_page(driver, out / "index.html")
    assert [b.text for b in driver.find_elements(By.CSS_SELECTOR, "button.head")] == ["mean"]
    keys(driver, "jlm")  # layer 1; with one head, next head and mean change nothing
    assert driver.execute_script("const a = document.getElementById('app'); return [a.dataset.layer, a.dataset.heads]") == ["1", "0"]
    P, _ = tr.example_patterns(1)
    Select(driver.find_element(By.ID, "example")).select_by_index(1)
    wait_ready(driver)
    hover(driver, "observer", 1)  # row 1 attends to all four keys, later ones included
    check_row(tokens(driver, "observer"), [P[1, 0, 1, :4]])
    hover(driver, "observed", 0)
    shown = tokens(driver, "observed")
    for q in range(4):
        assert abs(shown[q][0][0] - float(P[1, 0, q, 0])) <= float(P[1, 0, q].max()) / 510 + 1e-5


def test_inline_view_runs_nothing_from_tokens(driver, tmp_path):
    tr, _ = story_trace()
    page = tmp_path / "notebook.html"
    page.write_text("<!DOCTYPE html><html><body>" + inline_html(tr) + "</body></html>")
    driver.get(page.as_uri())
    driver.switch_to.frame(driver.find_element(By.CSS_SELECTOR, "iframe.attnflow-inline"))
    try:
        wait_ready(driver)
        hover(driver, "observer", 9)  # a round trip to the page, so an error event of a broken image has fired
        assert driver.execute_script("return window.__pwned") is None
        shown = tokens(driver, "observer")
        assert [shown[p][2] for p in (6, 7, 8)] == PAYLOADS  # the inline CSP allows inline scripts: escaping alone protects
        assert driver.find_elements(By.CSS_SELECTOR, "#app img, #app svg") == []
        P, _ = tr.example_patterns(0)
        check_row(tokens(driver, "observer"), [P[0, 0, 9, :10]])
        assert driver.execute_script("return window.__pwned") is None
    finally:
        driver.switch_to.default_content()
    assert driver.execute_script("return window.__pwned") is None


def demo_view(out: Path) -> tuple[Path, AttentionTrace, int]:
    """The demo organism on one held-out question: rollout and flow, attributions, gold documents marked."""
    import attnflow as af
    from attnflow.demo.run import EXCLUDE_KEYS, METHODS, document_spans, named

    model = af.demo.load()
    example = af.demo.task.generate(1, seed=11)[0]
    prompt, docs = af.demo.task.render_prompt(example)
    spans = document_spans(model.tokenizer, prompt, docs)
    tr = af.trace(model, [prompt], max_new_tokens=1, spans=[spans], dtype=torch.float32, progress=False, norms=True)
    flows = {m: af.attribution.flow_rows(tr, m, exclude_keys=EXCLUDE_KEYS) for m in ("rollout", "flow")}
    scores = pa.concat_tables(
        [named(af.attribute(tr, method=m, span_kind="document", exclude_keys=ex, heads=h), name) for name, m, ex, h in METHODS]
    )
    answer = tr.prompt_lengths[0]
    generated = tr.tokens[0][answer]
    info = [{"question": example.question, "answer": example.answer, "generated": generated, "correct": generated == example.answer}]
    flow_info = {m: {"alpha": 0.5, "heads": "mean", "exclude_keys": list(EXCLUDE_KEYS)} for m in flows}
    gold = {0: [docs[i][0] for i in example.support]}
    view = to_html(tr, out, flow=flows, attributions=scores, flow_info=flow_info, gold=gold, examples=info)
    return view, tr, answer


def test_write_screenshot(driver, tmp_path):
    """README screenshot: the demo organism's answer in the Flow view, gold documents outlined."""
    view, tr, answer = demo_view(tmp_path / "view")
    png = os.environ.get("ATTNFLOW_SCREENSHOT") or str(tmp_path / "viewer.png")
    browser_util.screenshot(view, png, hover=answer, mode="flow", layer=0, head=0, size=(1500, 900), d=driver)
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert panel_attr(driver, "flow", "frozen") == "true"
    gold = driver.execute_script("return Array.from(document.querySelectorAll('#tokens .span-box.gold')).map(b => +b.dataset.span)")
    assert gold == page_meta(driver)["examples"][0]["gold"] and gold
    assert "gold" in driver.find_element(By.ID, "legend").text
    picker = driver.find_element(By.ID, "example-info").text
    assert "question:" in picker and ("correct" in picker)
    bars = driver.execute_script("return Array.from(document.querySelectorAll('#bars .bar-row')).map(b => b.dataset.score)")
    assert len(bars) == len(tr.spans[0]) and all(b is not None for b in bars)


def page_meta(driver) -> dict:
    return json.loads(driver.execute_script("return document.getElementById('attnflow-data').textContent"))


def test_word_level_tokens_are_set_apart_by_spaces(driver, tmp_path):
    words = ["<s>", "alice", "lives", "in", "paris", "."]
    tr = make_trace([len(words)])
    tr.tokens, tr.prompt_lengths = [words], [len(words)]
    open_page(driver, to_html(tr, tmp_path / "view") / "index.html")
    text = driver.find_element(By.ID, "tokens").text
    assert "alice lives in paris ." in text

    bpe = make_trace([4])
    bpe.tokens, bpe.prompt_lengths = [["<s>", "Hello", "\u0120world", "!"]], [4]
    open_page(driver, to_html(bpe, tmp_path / "bpe") / "index.html")
    assert "Hello world!" in driver.find_element(By.ID, "tokens").text


# ----------------------------------------------------------------------------- real lengths
def big_trace(N=2048, L=30, H=9, seed=0) -> AttentionTrace:
    """N tokens, L layers x H heads of random peaked causal rows (float16); the layers share one draw
    (`expand`, so 2 GiB of patterns cost 75 MB), which timing does not care about."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(H, N, N, generator=g) * 2.5
    logits[:, :, 0] += 4  # a BOS sink in every head
    base = logits.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf")).softmax(-1).half()
    words = ["the", "cat", "sat", "on", "a", "mat", ".", "\n", "and", "then", "it", "slept"]
    return AttentionTrace(
        patterns=base.view(1, 1, H, N, N).expand(1, L, H, N, N),
        input_ids=torch.arange(N).view(1, N),
        attention_mask=torch.ones(1, N, dtype=torch.long),
        query_positions=torch.arange(N).view(1, N),
        tokens=[["<s>"] + [("Ġ" if i % 3 else "") + words[i % len(words)] for i in range(1, N)]],
        prompt_lengths=[N - 16],
        layers=list(range(L)),
        spans=[[Span(f"Document {d}", "document", 1 + 400 * d, 1 + 400 * (d + 1)) for d in range(4)]],
        model_info={"name": "/usr/lib/python3/site-packages/random-30x9", "num_layers": L, "num_heads": H},
        settings={"dtype": "float16", "rows": "all"},
    )


@pytest.fixture(scope="module")
def big_view(tmp_path_factory):
    return to_html(big_trace(), tmp_path_factory.mktemp("big") / "view")


WIDEST = """
const W = document.documentElement.clientWidth; let worst = [0, ''];
for (const e of document.querySelectorAll('body *')) { const r = e.getBoundingClientRect();
  if (r.right > worst[0]) worst = [r.right, e.tagName + '#' + e.id + '.' + e.className]; }
return [W, document.documentElement.scrollWidth, worst];
"""


PAGE_CLOCK = """
const at = (n) => { const e = performance.getEntriesByName(n); return e.length ? e[0] : null; };
const r = at('attnflow:ready'), t = at('attnflow:thumbs'), h = at('attnflow:hover');
return [r && r.startTime, t && t.startTime, h && h.duration];
"""
GOALS = (1000, 2000, 1000)  # ms by the page clock: first paint, head grid drawn, first hover painted


@pytest.mark.slow
def test_real_length_timings_and_width(driver, big_view):
    """2,048 tokens, 30 layers x 9 heads, best of 3 page loads: first paint and first hover < 1 s,
    the head grid < 2 s, by the page clock (a loaded CI machine can stall one load, not every one)."""
    driver.set_window_size(1400, 1000)
    runs = []  # per page load: [ms from navigation to the first weights painted, to the grid drawn, first hover's paint]
    for _ in range(3):
        driver.get("about:blank")
        open_page(driver, big_view / "index.html")
        WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.getElementById('headgrid').dataset.drawn") == "true")
        hover(driver, "observer", 2047)
        WebDriverWait(driver, 10).until(lambda d: d.execute_script(PAGE_CLOCK)[2] is not None)
        runs.append(driver.execute_script(PAGE_CLOCK))
        assert len(tokens(driver, "observer")[2047][0]) == 1  # the hover painted row 2047 of one head
        if all(v < goal for v, goal in zip(runs[-1], GOALS)):
            break
    best = [min(run[i] for run in runs) for i in range(3)]
    assert all(v > 0 for run in runs for v in run), runs  # every mark was taken on the page's own clock
    assert best[0] < GOALS[0] and best[1] < GOALS[1] and best[2] < GOALS[2], runs
    print(f"\n2048 x 30 x 9, page clock (ms), per load [ready, thumbs, first hover]: {runs}")
    assert driver.title == "attnflow: random-30x9"  # the path inside site-packages, not the absolute one
    shown = tokens(driver, "observer")
    assert shown.excluded == {0} and shown[2047][0] is not None and shown[0][1] is not None
    assert "sink" in driver.find_element(By.ID, "scale-note").text
    for width in (1400, 800):
        driver.set_window_size(width, 900)
        W, scroll, worst = driver.execute_script(WIDEST)
        assert scroll <= W and worst[0] <= W + 0.5, (width, W, scroll, worst)
    driver.set_window_size(1400, 1000)
    keys(driver, "jjl")  # layer 2, head 1: the grid outlines it, the matrix redraws
    hover(driver, "observed", 5)
    assert panel_attr(driver, "observed", "focus") == "5"


@pytest.fixture
def served(tmp_path):
    """A loopback server like Jupyter's /files/: 403 for any request without a Referer, but the launcher page."""
    import http.server
    import threading
    from functools import partial

    tr, F = story_trace()
    to_html(tr, tmp_path / "view", flow={"rollout": F})
    (tmp_path / "launch.html").write_text('<!DOCTYPE html><a id="go" href="view/index.html">open</a>')
    log = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            ref = self.headers.get("Referer")
            log.append((self.path, ref))
            if ref is None and self.path != "/launch.html":
                self.send_error(403, "Forbidden: no Referer")
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", log
    server.shutdown()
    server.server_close()


def test_served_like_jupyter_files(driver, served):
    base, log = served
    driver.get(base + "/launch.html")
    driver.find_element(By.ID, "go").click()
    wait_ready(driver)
    WebDriverWait(driver, 10).until(lambda d: d.execute_script("return document.getElementById('headgrid').dataset.drawn") == "true")
    paths = [p for p, _ in log]
    assert "/view/viewer.js" in paths and any(p.startswith("/view/shards/") for p in paths) and any(p.startswith("/view/thumbs/") for p in paths)
    assert [p for p, ref in log if ref is None] == ["/launch.html"]  # every other request carried a Referer
    hover(driver, "observer", 3)
    assert tokens(driver, "observer")[3][0] is not None
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "favicon.ico" not in e["message"]]
    assert errors == []  # (the launcher page has no favicon: Chromium's 404 for it is not the viewer's)
