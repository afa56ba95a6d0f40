"""The evaluation on the real model: one HotPotQA question through `attnflow eval hotpotqa` on SmolLM2 (teacher mode)."""

import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from real_model import hotpot_file, require_smollm2  # noqa: E402

from attnflow.cli import main  # noqa: E402
from attnflow.eval.methods import ATTENTION_NAMES  # noqa: E402

pytestmark = pytest.mark.real


def test_one_question_in_teacher_mode_holds_every_method(tmp_path, capsys):
    gguf = require_smollm2()
    data = hotpot_file()
    if data is None:
        pytest.skip("the shared HotPotQA slice is not found above the repository")
    out = tmp_path / "smol"
    argv = ["eval", "hotpotqa", "--model", str(gguf), "--data", str(data), "--out", str(out),
            "--mode", "teacher", "--limit", "1", "--views", "0", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    ex = pq.read_table(out / "examples.parquet").to_pylist()
    at = pq.read_table(out / "attribution.parquet")
    assert len(ex) == 1 and ex[0]["status"] == "ok" and ex[0]["answer_span"] == ex[0]["answer"]
    assert ex[0]["prompt_tokens"] > 1000  # a real distractor prompt, chat template applied
    got = {(r["level"], r["method"]) for r in at.select(["level", "method"]).to_pylist()}
    # + the LOO reference at paragraph level (AT2 needs 2 or more examples: not fit on one)
    assert got == {(lv, m) for lv in ("sentence", "paragraph") for m in ATTENTION_NAMES} | {("paragraph", "loo")}
    summary = pq.read_table(out / "summary.parquet").to_pylist()
    assert {r["method"] for r in summary if r["subset"] == "position"} == {*ATTENTION_NAMES, "loo", "gold"}
    assert all(f"| {m} |" in text for m in (*ATTENTION_NAMES, "loo")) and "position bias" in text
    loo = [r for r in at.to_pylist() if r["method"] == "loo"][0]
    assert len(loo["scores"]) == 10 and all(abs(d) < 50 for d in loo["scores"]) and "cost per example" in text
    print(next(line for line in text.splitlines() if line.startswith("cost per example")), file=sys.stderr)
