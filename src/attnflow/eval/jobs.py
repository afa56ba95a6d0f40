"""Which examples a run evaluates, their prompts, and the fixed batches the runner commits one by one.

Examples are selected by `limit` (the first N rows of the file) then by
`shard` `i/N` (rows with index % N == i), so merged shards equal one run over the
same limit.  Batches are `batch_size` valid examples of similar prompt length (sorted
by length, then index, so padding stays small), cut from the examples not yet
committed, so a resumed run commits the same parts as an uninterrupted one and an
extended run (a larger limit) evaluates only the new examples.

    >>> examples = demo_examples(4, seed=0)
    >>> jobs = prepare(examples, tokenizer, RunConfig(task="demo"), limit_tokens=512)
    >>> [(j.example.index, len(j.prompt), j.status) for j in jobs]
    [(0, 47, 'ok'), (1, 26, 'ok'), (2, 47, 'ok'), (3, 47, 'ok')]
    >>> [[j.example.index for j in b] for b in batches(jobs, 2)]       # shortest prompts first
    [[1, 0], [2, 3]]
    >>> [part_name(b) for b in batches(jobs, 2)]
    ['part-000000001', 'part-000000002']
    >>> [part_name(b) for b in batches(jobs, 2, done={1, 0})]          # resumed: part-000000001 is committed
    ['part-000000002']
    >>> prepare(examples[:1], tokenizer, RunConfig(task="demo"), limit_tokens=32)[0].reason
    '47 prompt tokens + answer > 32'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from attnflow.eval.config import RunConfig
from attnflow.eval.datasets import Problem, QAExample, demo_examples, load_hotpotqa
from attnflow.eval.prompts import Prompt, build_prompt, template_text


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
    template = template_text(config.prompt_template) if config.task == "hotpotqa" else None
    for ex in examples:
        prompt = build_prompt(ex, tokenizer, None if config.chat_template else False, template, config.system)
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


def batches(jobs: list[Job], batch_size: int, done: set[int] = frozenset()) -> list[list[Job]]:
    """The valid jobs whose index is not in `done`, sorted by prompt length (then index), cut into batches
    of `batch_size` (the last may be shorter)."""
    ok = sorted((j for j in jobs if j.status == "ok" and j.example.index not in done), key=_length_key)
    return [ok[i : i + batch_size] for i in range(0, len(ok), batch_size)]


def _length_key(job: Job) -> tuple[int, int]:
    return len(job.prompt) + len(job.completion or ()), job.example.index


def part_name(batch: list[Job]) -> str:
    """The committed directory of a batch, named by its first example's index."""
    return f"part-{batch[0].example.index:09d}"
