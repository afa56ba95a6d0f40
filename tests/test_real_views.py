"""The offline viewer on SmolLM2 and a real HotPotQA prompt: decoded token text, gold documents, the README screenshot.

Set ATTNFLOW_SCREENSHOT_DIR=docs to write `docs/viewer-smollm2.png` (else it goes to a temporary dir).
The question is HotPotQA dev #20 (answer "Pedro Rodríguez"): its gold paragraphs hold "é", "í"
and its prompt an en dash, which a byte-level BPE tokenizer splits into byte tokens ("âĢĵ").
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from selenium.webdriver.common.by import By

import attnflow as af
import browser_util
from attnflow.attribution import producing_row, target_flow
from attnflow.eval.prompts import build_prompt
from attnflow.exporters import to_html

pytestmark = [
    pytest.mark.real,
    pytest.mark.browser,
    pytest.mark.skipif(not browser_util.available(), reason="needs Debian's chromium and chromium-driver"),
]

EXAMPLE = 20  # "Which other Mexican Formula One race car driver has held the podium besides ...?"
NEW_TOKENS = 6
EXCLUDE = (0,)  # the first token is SmolLM2's attention sink
TEXT = "return document.getElementById('tokens').textContent"


def smollm2_view(model, example, out: Path):
    """Prompt -> greedy answer, every row recorded (head mean, float16), rollout and flow of the answer rows."""
    p = build_prompt(example, model.tokenizer)
    docs = p.paragraph_spans
    tr = af.trace(model, [p.input_ids], spans=[docs], heads="mean", dtype=torch.float16,
                  max_new_tokens=NEW_TOKENS, progress=False)
    n, L = tr.prompt_lengths[0], tr.lengths[0]
    rows = [producing_row(t) for t in range(n, L)]
    flows = {m: (target_flow(tr, [rows], m, exclude_keys=EXCLUDE), torch.tensor([rows])) for m in ("rollout", "flow")}
    answer = "".join(tr.display(0)[n:]).strip()
    gold = [i for i, g in enumerate(p.gold_paragraphs) if g]
    info = [{"question": example.question, "answer": example.answer, "generated": answer,
             "correct": example.answer.lower() in answer.lower()}]
    flow_info = {m: {"alpha": 0.5, "heads": "mean", "exclude_keys": list(EXCLUDE)} for m in flows}
    view = to_html(tr, out, flow=flows, flow_info=flow_info, gold={0: gold}, examples=info)
    return view, tr, p, gold


def test_smollm2_hotpot_view_decoded_text_gold_and_screenshot(smollm2, hotpot_examples, tmp_path):
    example = hotpot_examples[EXAMPLE]
    assert example.answer == "Pedro Rodr\u00edguez"
    view, tr, p, gold = smollm2_view(smollm2.model, example, tmp_path / "view")
    n = tr.prompt_lengths[0]
    assert 1400 <= n <= 1600 and tr.patterns.shape == (1, 30, 1, tr.lengths[0], tr.lengths[0])
    assert "".join(tr.display(0)[:n]) == p.text  # the display strings are the prompt's own text
    assert any("\u0122" in t or "\u00c3" in t for t in tr.tokens[0])  # the raw vocabulary strings are byte garbage
    out_dir = os.environ.get("ATTNFLOW_SCREENSHOT_DIR")
    png = Path(out_dir) / "viewer-smollm2.png" if out_dir else tmp_path / "viewer-smollm2.png"
    d = browser_util.driver(1500, 900)
    try:
        browser_util.screenshot(view, png, hover=n, mode="flow", size=(1500, 900), d=d)
        text = d.execute_script(TEXT)
        # the page shows the text the tokens cover, independently: the sentences of the JSON file
        for sentence in ("Pedro Rodr\u00edguez is the most successful Mexican driver being the only one to have won a grand prix.",
                         'also known as "Checo" P\u00e9rez, is a Mexican racing driver', "the 1996\u201397 Indy Racing League season"):
            assert sentence in text, sentence
        for garbage in ("\u00e2\u0122", "\u00c3\u0143", "\u00c3\u00a9", "\u0120", "\u010a", "\ufffd"):
            assert garbage not in text, garbage
        boxes = d.execute_script("return Array.from(document.querySelectorAll('#tokens .span-box.gold')).map(b => +b.dataset.span)")
        assert boxes == gold and len(gold) == 2
        assert "gold" in d.find_element(By.ID, "legend").text
        picker = d.find_element(By.ID, "example-info").text
        assert "Formula One" in picker and "Rodr\u00edguez" in picker
        assert d.execute_script("return document.getElementById('app').dataset.mode") == "flow"
        assert [e for e in d.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        d.quit()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
