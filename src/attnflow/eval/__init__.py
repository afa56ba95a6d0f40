"""Document-QA attribution evaluation: does attention flow point at the documents an answer came from?

    attnflow eval demo --out runs/demo --limit 200            # the embedded model organism
    attnflow eval hotpotqa --model M --data hotpot_dev_distractor_v1.json --out runs/hp

Modules, in the order data flows:

    datasets.py   HotPotQA (official JSON, HF parquet/jsonl) and the demo task -> QAExample; bad rows -> Problem
    prompts.py    rendered prompt, chat template, token spans per paragraph and sentence (from offsets), gold labels
    methods.py    random, raw, sum, rollout, flow, flow_normalized (each with and without the BOS sink) -> span scores
    loo.py        leave-one-out ablation: the answer's log-prob drop per removed document (prefix KV reused), drop@k
    at2.py        AT2: non-negative [layer, head] weights fit to the LOO drops, cross-validated; at2_heads.safetensors
    metrics.py    precision@k, recall@k, MRR, nDCG, AUROC (tie rules documented there), Spearman / drop@k against
                  LOO, EM/F1, bootstrap CIs
    config.py     RunConfig (the settings that decide the results) and the i/N shard syntax
    jobs.py       selecting examples (limit, shard), prompts per example, the fixed batches
    batch.py      one batch: trace, answers, span scores and metrics -> table rows
    calibrate.py  side passes: content-free calibration ("<method>/cal", --calibrate) and the shuffle check
    views.py      offline attention views of the first examples
    store.py      parts on disk, resume checks, the final tables, merging shard runs
    runner.py     `evaluate`: the resumable, shardable run over those (the command is `attnflow.cli.eval`)
    report.py     summary table (printed, summary.parquet, summary.md), precision/recall plot, explorer.html
"""
