"""The settings of an evaluation run: everything that decides its results, and the `i/N` shard syntax.

    >>> config = RunConfig(task="demo", limit=200, shard="1/4")
    >>> config.shard_pair, config.new_tokens, config.pair_mode
    ((1, 4), 3, 'all')
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from attnflow import _checks
from attnflow.errors import BadArgumentError

DEFAULT_NEW_TOKENS = {"demo": 3, "hotpotqa": 16}
DEFAULT_DEMO_EXAMPLES = 200
PAIR_MODE = {"demo": "all", "hotpotqa": "methods"}  # the demo has 3-8 documents (<= 28 pairs); HotPotQA 10 (45)
PAIR_MODES = ("methods", "all")


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides an evaluation's results (and nothing that doesn't)."""

    task: str  # "hotpotqa" | "demo"
    model: str | None = None  # None: the embedded demo model
    data: str | None = None
    seed: int | None = None
    two_hop: bool = False
    mode: str = "generate"  # "generate" | "teacher"
    limit: int | None = None
    shard: str | None = None  # "i/N"
    max_context_tokens: int | None = None
    max_new_tokens: int | None = None
    batch_size: int = 1
    memory_budget: int | None = None  # bytes of one layer's float32 recording transient (None: the trace's default)
    dtype: str = "float32"  # model weights
    device_map: str | None = None
    prompt_template: str = "default"  # a named template (prompts.TEMPLATES) or a template file's absolute path
    chat_template: bool = True  # apply the tokenizer's chat template when it has one
    system: str | None = None  # system prompt (chat template only)
    calibrate: str | None = None  # a content-free question ("N/A"): add "<method>/cal" scores (eval/calibrate.py)
    shuffle_check: int = 0  # re-run the first K examples with their documents shuffled (eval/calibrate.py)

    # leave-one-out ground truth (eval/loo.py) and the metrics against it; AT2 head weights need it
    loo: bool = True
    loo_sentences: bool = False  # also one forward per sentence (sentence-level "loo" rows, spearman_loo)
    loo_pairs: str | None = None  # top-2 removals: "methods" (each method's top-2 pair) | "all"; None: PAIR_MODE

    def __post_init__(self):
        """Every field's type and range, checked once (the CLI's flags name them first, before this)."""
        _checks.choice("task", self.task, tuple(DEFAULT_NEW_TOKENS))
        _checks.choice("mode", self.mode, ("generate", "teacher"))
        _checks.choice("dtype", self.dtype, _checks.FLOAT_DTYPES)
        for name in ("model", "data", "device_map", "system"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise BadArgumentError(f"{name}={value!r}; use a string (or None)")
        if not isinstance(self.prompt_template, str):
            raise BadArgumentError(f"prompt_template={self.prompt_template!r}; use a template name or a file path")
        if self.seed is not None and not _checks.is_int(self.seed):
            raise BadArgumentError(f"seed={self.seed!r}; use an integer (or None)")
        for name in ("limit", "max_context_tokens", "max_new_tokens", "memory_budget"):
            _checks.optional_count(name, getattr(self, name), minimum=1)
        _checks.count("batch_size", self.batch_size, minimum=1)
        _checks.flag("two_hop", self.two_hop)
        _checks.flag("chat_template", self.chat_template)
        parse_shard(self.shard)
        _checks.flag("loo", self.loo)
        _checks.flag("loo_sentences", self.loo_sentences)
        if self.loo_pairs is not None:
            _checks.choice("loo_pairs", self.loo_pairs, PAIR_MODES)
        if self.calibrate is not None and (not isinstance(self.calibrate, str) or not self.calibrate.strip()):
            raise BadArgumentError(f"calibrate={self.calibrate!r}; use a content-free question such as 'N/A' (or None)")
        _checks.count("shuffle_check", self.shuffle_check, minimum=0)

    @property
    def shard_pair(self) -> tuple[int, int]:
        return parse_shard(self.shard)

    @property
    def pair_mode(self) -> str:
        """Which paragraph pairs are removed together: "all" (exact random drop@2, every method's and AT2's
        drop@2) or "methods" (the distinct top-2 pairs of the methods scored in the batch)."""
        return self.loo_pairs or PAIR_MODE[self.task]

    @property
    def new_tokens(self) -> int:
        return self.max_new_tokens or DEFAULT_NEW_TOKENS[self.task]

    def to_json(self) -> dict:
        """The settings, plus the template's text (`prompt_template_text`), so a changed template file is seen."""
        from attnflow.eval.prompts import template_text

        text = template_text(self.prompt_template) if self.task == "hotpotqa" else None
        return asdict(self) | {"prompt_template_text": text}


# settings a resumed run may change, as long as its examples include the old ones (`store.check_growth`)
GROWABLE = ("limit", "shard")
# settings that change how a run computes, not what it finds: a resumed run may change them freely
EXECUTION = ("memory_budget",)


def parse_shard(text: str | None) -> tuple[int, int]:
    """"i/N" -> (i, N) with 0 <= i < N; None -> (0, 1).

    >>> parse_shard("0/4"), parse_shard(None)
    ((0, 4), (0, 1))
    """
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise BadArgumentError(f"--shard {text!r}; use i/N with 0 <= i < N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise BadArgumentError(f"--shard {text!r}; use i/N with 0 <= i < N, e.g. 0/4")
    return i, n
