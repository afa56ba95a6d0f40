"""Which examples a run evaluates, their prompts, and the fixed batches the runner commits one by one.

Examples are selected by `limit` (the first N rows of the file) then by
`shard` `i/N` (rows with index % N == i), so merged shards equal one run over the
same limit.  Batches are `batch_size` consecutive valid examples, cut the same way
on every run, so a resumed run commits the same parts as an uninterrupted one.

    >>> jobs = prepare(examples, tokenizer, RunConfig(task="demo"), limit_tokens=512)
    >>> [part_name(b) for b in batches(jobs, 2)]
    ['part-000000000', 'part-000000002', ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from attnflow.eval.config import RunConfig
from attnflow.eval.datasets import Problem, QAExample, demo_examples, load_hotpotqa
from attnflow.eval.prompts import Prompt, build_prompt


@dataclass
class Job:
    """A prepared example: its prompt, forced completion (teacher mode) and status."""

    example: QAExample
    prompt: Prompt | None = None
    completion: list[int] | None = None
    status: str = "ok"
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def select_examples(config: RunConfig) -> tuple[list[QAExample], list[Problem]]:
    """The examples (and malformed rows) of this run: the first `limit` rows, then this shard's."""
    if config.task == "demo":
        examples, problems = demo_examples(config.limit, seed=config.seed, two_hop=config.two_hop), []
    else:
        examples, problems = load_hotpotqa(config.data)
    i, n = config.shard_pair
    keep = lambda index: (config.limit is None or index < config.limit) and index % n == i  # noqa: E731
    return [e for e in examples if keep(e.index)], [p for p in problems if keep(p.index)]


def prepare(examples: list[QAExample], tokenizer, config: RunConfig, limit_tokens: int | None) -> list[Job]:
    """Prompts for every example; those over `limit_tokens` (prompt + answer budget) are marked too_long."""
    jobs = []
    for ex in examples:
        prompt = build_prompt(ex, tokenizer)
        job = Job(ex, prompt)
        if config.mode == "teacher":
            job.completion = list(tokenizer(prompt.answer_prefix + ex.answer, add_special_tokens=False)["input_ids"])
            need = len(prompt) + len(job.completion)
        else:
            need = len(prompt) + config.new_tokens
        if limit_tokens is not None and need > limit_tokens:
            job.status, job.reason = "too_long", f"{len(prompt)} prompt tokens + answer > {limit_tokens}"
        jobs.append(job)
    return jobs


def batches(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    """The valid jobs cut into consecutive batches of `batch_size` (the last may be shorter)."""
    ok = [j for j in jobs if j.status == "ok"]
    return [ok[i : i + batch_size] for i in range(0, len(ok), batch_size)]


def part_name(batch: list[Job]) -> str:
    """The committed directory of a batch, named by its first example's index."""
    return f"part-{batch[0].example.index:09d}"
