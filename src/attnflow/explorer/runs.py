"""Runs of the explorer: generate from a prompt, record head-mean attention once, answer the page from that record.

    >>> runner = Runner({"demo": af.demo.load}, Limits())
    >>> run = runner.submit(runner.prepare({"model": "demo", "prompt": "question : what is the city of alice ?",
    ...                                     "documents": [{"name": "doc1", "text": "alice lives in paris ."}]}))
    >>> run.wait()                       # tokens stream into run.events while it generates
    True
    >>> run.trace.tokens[0][-3:]         # the generated answer and end token
    ['?', 'paris', '</s>']
    >>> runner.graph(run, target=None, tau=0.01)["edge_counts"]   # drawn edges per layer
    [21, 23, 21, 12]

A document may carry `"gold": true` (or `"supporting": true`): its span is listed in
the run's `gold` (span indices), which the page outlines and the export marks.
Token text is sent twice: `tokens` (the vocabulary strings) and `text` (what each
token covers, `attnflow.tokens`), so byte-level BPE shows "–", not "âĢĵ".

A run is one request: the model generates greedily (tokens streamed as events),
then `attnflow.trace(..., heads="mean", dtype=float32)` records every layer of
prompt + completion once (teacher forcing).  Graphs, attributions and exports are
answered from that record; per-head patterns of one layer for chosen rows are
recorded on demand (one more forward pass) and cached.  A single worker thread
runs the queue; every forward pass holds the runner's model lock.  Finished runs
live in an LRU bounded in bytes (`Limits.cache_bytes`); an evicted run is gone.
"""

from __future__ import annotations

import io
import queue
import secrets
import tempfile
import threading
import time
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from attnflow.errors import AttnflowError, BadArgumentError, PromptError

__all__ = ["Limits", "Prepared", "QueueFull", "Run", "RunGone", "Runner"]

Loader = Callable[[], Any]


class QueueFull(AttnflowError):
    """More runs are waiting than `Limits.max_queued`."""


class RunGone(AttnflowError, KeyError):
    """No such run (never made, or evicted from the cache)."""


@dataclass(frozen=True)
class Limits:
    """What one server accepts.  Bodies and token counts are refused before any forward pass."""

    max_tokens: int = 2048  # prompt + tokens to generate, per run
    max_new_tokens: int = 64
    max_queued: int = 4  # runs waiting or running; one more is refused (429)
    max_body: int = 1 << 20  # bytes of one request body (413 above)
    max_documents: int = 64
    max_head_rows: int = 256  # rows of one /heads request
    cache_bytes: int = 2 << 30  # finished runs' records kept in memory


@dataclass
class Prepared:
    """A validated request: token ids, document spans, the model to use."""

    model: str
    ids: list[int]
    spans: list  # attnflow.Span
    max_new_tokens: int
    gold: list[int] = field(default_factory=list)  # indices of the spans marked supporting


@dataclass
class Run:
    id: str
    prepared: Prepared
    state: str = "queued"  # queued | running | done | error
    events: list[dict] = field(default_factory=list)
    trace: Any = None  # AttentionTrace of prompt + completion, heads="mean", float32
    record: torch.Tensor | None = None  # [layer, query, key] head means of the one example
    head_cache: dict = field(default_factory=dict)  # (layer, row) -> [head, key]
    error: str | None = None
    created: float = field(default_factory=time.time)
    finished: threading.Event = field(default_factory=threading.Event)

    def emit(self, event: str, **data) -> None:
        self.events.append({"event": event, **data})

    def wait(self, timeout: float | None = None) -> bool:
        return self.finished.wait(timeout)

    @property
    def nbytes(self) -> int:
        n = 0 if self.record is None else self.record.numel() * self.record.element_size()
        return n + sum(t.numel() * t.element_size() for t in self.head_cache.values())


class Runner:
    """The allow-listed models, the run queue, its worker thread and the cache of finished runs."""

    def __init__(self, models: dict[str, Loader], limits: Limits = Limits()):
        if not models:
            raise BadArgumentError("no models to serve; give at least one (the demo model by default)")
        self.models, self.limits = dict(models), limits
        self._loaded: dict[str, Any] = {}
        self.model_lock = threading.RLock()  # one forward pass at a time, whatever thread asks
        self._lock = threading.Lock()
        self._queue: queue.Queue[Run] = queue.Queue()
        self._runs: OrderedDict[str, Run] = OrderedDict()
        self._worker: threading.Thread | None = None

    # --- models ----------------------------------------------------------------------
    def model(self, name: str) -> Any:
        """The loaded model `name` from the allow-list; BadArgumentError for any other name."""
        if not isinstance(name, str) or name not in self.models:
            raise BadArgumentError(f"unknown model {str(name)[:80]!r}; choose one of: {', '.join(self.models)}")
        with self.model_lock:
            if name not in self._loaded:
                self._loaded[name] = self.models[name]()
            return self._loaded[name]

    # --- requests --------------------------------------------------------------------
    def prepare(self, body: Any) -> Prepared:
        """Validate a run request and tokenize it; PromptError when it is over the token limit."""
        if not isinstance(body, dict):
            raise BadArgumentError("the request body must be a JSON object with model, prompt or messages")
        name = body.get("model", next(iter(self.models)))
        model = self.model(name)
        new = body.get("max_new_tokens", 8)
        if not isinstance(new, int) or isinstance(new, bool) or not 1 <= new <= self.limits.max_new_tokens:
            raise BadArgumentError(f"max_new_tokens={new!r}; use an integer in 1..{self.limits.max_new_tokens}")
        docs, gold = _documents(body.get("documents") or [], self.limits.max_documents)
        tok = model.tokenizer
        if body.get("messages") is not None:
            text, ranges = _chat_text(tok, body["messages"], docs)
            special = False
        else:
            text, ranges = _prompt_text(body.get("prompt"), docs)
            special = True
        ids = list(tok(text, add_special_tokens=special)["input_ids"])
        total = len(ids) + new
        if not ids:
            raise PromptError("the prompt tokenizes to nothing; give it some text")
        if total > self.limits.max_tokens:
            raise PromptError(
                f"the prompt has {len(ids)} tokens (+ {new} to generate = {total}); this server records at most "
                f"{self.limits.max_tokens} per run: shorten it or restart with a larger --max-tokens"
            )
        positions = _max_positions(model)
        if positions is not None and total > positions:
            raise PromptError(
                f"the prompt has {len(ids)} tokens (+ {new} to generate = {total}); model {name!r} takes at most "
                f"{positions} positions: shorten it"
            )
        from attnflow.attribution import text_spans

        spans = text_spans(tok, text, ranges, kind="document", add_special_tokens=special) if ranges else []
        return Prepared(name, ids, spans, new, gold)

    def submit(self, prepared: Prepared) -> Run:
        """Queue a run; QueueFull when `max_queued` runs are already waiting or running."""
        with self._lock:
            busy = sum(r.state in ("queued", "running") for r in self._runs.values())
            if busy >= self.limits.max_queued:
                raise QueueFull(f"{busy} runs are queued or running (at most {self.limits.max_queued}); wait for one to finish")
            run = Run(secrets.token_hex(8), prepared)
            run.emit("queued", position=busy)
            self._runs[run.id] = run
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="attnflow-serve-runs", daemon=True)
                self._worker.start()
        self._queue.put(run)
        return run

    def get(self, run_id: str) -> Run:
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                raise RunGone(f"no run {run_id[:40]!r} (evicted from the cache, or never made); start it again")
            self._runs.move_to_end(run_id)
            return run

    # --- the worker ------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            run = self._queue.get()
            run.state = "running"
            try:
                self.execute(run)
                run.state = "done"
                run.emit("done")
            except Exception as err:  # the page shows the message; the server keeps going
                run.state, run.error = "error", _one_line(err)
                run.emit("error", message=run.error)
            finally:
                run.finished.set()
                self._evict()

    def execute(self, run: Run) -> None:
        """Generate (streaming token events), then record every layer's head-mean patterns."""
        import attnflow as af

        p = run.prepared
        model = self.model(p.model)
        tok = model.tokenizer
        run.emit("progress", stage="generating", prompt_tokens=len(p.ids))
        t0 = time.perf_counter()
        with self.model_lock:
            new = _generate(model, p.ids, p.max_new_tokens, lambda out: run.emit("token", **_token(tok, p.ids, out)))
            run.emit("progress", stage="recording", seconds=round(time.perf_counter() - t0, 3))
            tr = af.trace(model, [p.ids], completions=[new], heads="mean", dtype=torch.float32,
                          spans=[p.spans], progress=False)
        run.trace, run.record = tr, tr.patterns[0, :, 0].contiguous()  # [layer, query, key]
        run.emit("recorded", **self.summary(run), seconds=round(time.perf_counter() - t0, 3))

    def _evict(self) -> None:
        """Drop the least recently used finished runs while the cache holds more than cache_bytes."""
        with self._lock:
            total = sum(r.nbytes for r in self._runs.values())
            for rid in list(self._runs):
                if total <= self.limits.cache_bytes:
                    break
                r = self._runs[rid]
                if r.state in ("done", "error"):
                    total -= r.nbytes
                    del self._runs[rid]

    # --- answers ---------------------------------------------------------------------
    def summary(self, run: Run) -> dict:
        tr = run.trace
        return {
            "id": run.id,
            "model": run.prepared.model,
            "state": run.state,
            "tokens": list(tr.tokens[0]),
            "text": list(tr.display(0)),
            "prompt_length": int(tr.prompt_lengths[0]),
            "layers": len(tr.layers),
            "heads": int(tr.model_info.get("num_heads") or 0) or None,
            "spans": [{"name": s.name, "kind": s.kind, "start": s.start, "end": s.end} for s in tr.spans[0]],
            "gold": list(run.prepared.gold),
        }

    def ready(self, run: Run) -> None:
        if run.record is None:
            raise BadArgumentError(f"run {run.id} is {run.state}" + (f": {run.error}" if run.error else "; wait for it"))

    def graph(self, run: Run, target: int | None = None, **kw) -> dict:
        """The flow graph of the output token at position `target` (default: the first generated one)."""
        from attnflow.explorer.graph import flow_graph

        self.ready(run)
        n, p = run.record.shape[-1], int(run.trace.prompt_lengths[0])
        target = min(p, n - 1) if target is None else target
        if not isinstance(target, int) or not 1 <= target <= n:
            raise BadArgumentError(f"target={target!r}; use a token position in 1..{n} (the token after the run is {n})")
        g = flow_graph(run.record, target - 1, **kw)
        g["target"] = target
        return g

    def heads(self, run: Run, layer: int, rows: list[int]) -> torch.Tensor:
        """Per-head patterns `[head, row, key]` of `layer` for query `rows`, recorded on demand and cached."""
        import attnflow as af

        self.ready(run)
        L, n = run.record.shape[0], run.record.shape[-1]
        if not isinstance(layer, int) or not 0 <= layer < L:
            raise BadArgumentError(f"layer={layer!r}; use 0..{L - 1}")
        if not rows or len(rows) > self.limits.max_head_rows or any(not 0 <= r < n for r in rows):
            raise BadArgumentError(f"rows must be 1..{self.limits.max_head_rows} positions in 0..{n - 1}")
        missing = sorted({r for r in rows if (layer, r) not in run.head_cache})
        if missing:
            with self.model_lock:
                tr = af.trace(self.model(run.prepared.model), [run.trace.input_ids[0].tolist()], heads="all",
                              layers=[layer], rows=missing, dtype=torch.float32, progress=False)
            P = tr.patterns[0, 0]  # [head, row, key]
            for i, r in enumerate(missing):
                run.head_cache[layer, r] = P[:, i].clone()
            self._evict()
        return torch.stack([run.head_cache[layer, r] for r in rows], 1)  # [head, row, key]

    def attribution(self, run: Run, target: int | None = None, alpha: float = 0.5, sinks: bool = True) -> dict:
        """Per-document shares of the output token at `target` (rollout), plus prompt/completion/excluded shares."""
        import attnflow as af

        g = self.graph(run, target, tau=1.0, alpha=alpha, exclude_keys=(0,) if sinks else ())
        bottom = torch.tensor(g["bottom"])
        excluded = g["sink_share"]
        spans = run.trace.spans[0]
        docs = []
        if any(s.kind == "document" for s in spans):
            tab = af.attribute(run.trace, method="rollout", targets=[g["target"]], alpha=alpha,
                               exclude_keys=(0,) if sinks else (), span_kind="document").to_pylist()
            gold = set(run.prepared.gold)
            docs = [{"name": spans[r["source_span"]].name, "score": (1 - excluded) * r["score"], "rank": r["rank"],
                     "gold": r["source_span"] in gold} for r in tab]
        p = int(run.trace.prompt_lengths[0])
        in_docs = torch.zeros_like(bottom, dtype=torch.bool)
        for s in spans:
            if s.kind == "document":
                in_docs[s.start : s.end] = True
        completion = float(bottom[p:].sum()) * (1 - excluded)
        other = float(bottom[:p][~in_docs[:p]].sum()) * (1 - excluded)
        return {"target": g["target"], "documents": docs, "excluded": excluded, "completion": completion,
                "other_prompt": other}

    def export(self, run: Run) -> bytes:
        """A zip of the run as the offline viewer (html/) and Parquet (parquet/)."""
        import attnflow as af
        from attnflow.attribution import producing_row, target_flow

        self.ready(run)
        tr = run.trace
        p, n = int(tr.prompt_lengths[0]), tr.lengths[0]
        rows = [producing_row(t) for t in range(max(p, 1), n)] or [n - 1]
        R = target_flow(tr, [rows], "rollout", exclude_keys=(0,))
        flow = {"rollout": (R, torch.tensor([rows]))}
        attributions = None
        if any(s.kind == "document" for s in tr.spans[0]):
            attributions = af.attribute(tr, method="rollout", exclude_keys=(0,), span_kind="document")
        buf = io.BytesIO()
        with tempfile.TemporaryDirectory(prefix="attnflow-export-") as d:
            gold = {0: list(run.prepared.gold)} if run.prepared.gold else None
            flow_info = {"rollout": {"alpha": 0.5, "heads": "mean", "exclude_keys": [0]}}
            af.exporters.to_html(tr, Path(d) / "html", flow=flow, attributions=attributions, flow_info=flow_info, gold=gold)
            af.exporters.to_parquet(tr, Path(d) / "parquet", flow=flow, attributions=attributions)
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
                for f in sorted(Path(d).rglob("*")):
                    if f.is_file():
                        z.write(f, f"attnflow-run-{run.id}/{f.relative_to(d)}")
        return buf.getvalue()


# --- helpers ---------------------------------------------------------------------------
def _documents(docs: Any, limit: int) -> tuple[list[tuple[str, str]], list[int]]:
    """(name, text) of each document, and the indices of those flagged `gold` / `supporting`."""
    if not isinstance(docs, list) or len(docs) > limit:
        raise BadArgumentError(f"documents must be a list of at most {limit} {{name, text}} objects")
    out, gold = [], []
    for i, d in enumerate(docs):
        if not isinstance(d, dict) or not isinstance(d.get("text"), str) or not d["text"].strip():
            raise BadArgumentError(f"document {i} needs a non-empty text")
        name = d.get("name") or f"doc{i + 1}"
        if not isinstance(name, str):
            raise BadArgumentError(f"document {i} has a name that is no string")
        flags = [d[k] for k in ("gold", "supporting") if k in d]
        if any(not isinstance(f, bool) for f in flags):
            raise BadArgumentError(f"document {i} has a gold/supporting flag that is no boolean (true or false)")
        if any(flags):
            gold.append(i)
        out.append((name, d["text"]))
    return out, gold


def _prompt_text(prompt: Any, docs: list[tuple[str, str]]) -> tuple[str, list[tuple[str, int, int]]]:
    """`{name} : {text}\\n` per document, then the prompt; (text, (name, char_start, char_end) per document)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError("the prompt is empty; type some text (or send chat messages)")
    parts, ranges, pos = [], [], 0
    for name, text in docs:
        head = f"{name} : "
        ranges.append((name, pos + len(head), pos + len(head) + len(text)))
        parts.append(head + text + "\n")
        pos += len(parts[-1])
    return "".join(parts) + prompt, ranges


def _chat_text(tok: Any, messages: Any, docs: list[tuple[str, str]]) -> tuple[str, list[tuple[str, int, int]]]:
    """The chat template applied (generation prompt on), documents prepended to the first user message."""
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    )
    if not ok:
        raise PromptError("messages must be a non-empty list of {role, content} strings")
    if not getattr(tok, "chat_template", None):
        raise PromptError("this model's tokenizer has no chat template; send a plain prompt instead")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    user = next((i for i, m in enumerate(messages) if m["role"] == "user"), 0)
    block = "".join(f"{name} : {text}\n" for name, text in docs)
    messages[user]["content"] = block + messages[user]["content"]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ranges, pos = [], 0
    for name, doc in docs:
        at = text.find(f"{name} : {doc}\n", pos)
        start = at + len(name) + 3
        ranges.append((name, start, start + len(doc)))
        pos = start + len(doc)
    return text, ranges


def _generate(model: Any, ids: list[int], max_new_tokens: int, on_token: Callable[[list[int]], None]) -> list[int]:
    """Greedy tokens after `ids` (cut after the first end token); `on_token(tokens so far)` as each appears."""
    from transformers.generation.streamers import BaseStreamer

    from attnflow.tracers.hf import _device, as_nnsight, greedy, pad_id
    from attnflow.tracers.inputs import id_set

    _, hf, tok = as_nnsight(model)
    eos = id_set(getattr(getattr(hf, "generation_config", None), "eos_token_id", None))
    out: list[int] = []

    class Streamer(BaseStreamer):
        prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:  # generate() first hands over the prompt
                self.prompt_seen = True
                return
            for t in value.flatten().tolist():
                if len(out) < max_new_tokens and not (out and out[-1] in eos):
                    out.append(t)
                    on_token(out)

        def end(self):
            pass

    x = torch.tensor([ids], device=_device(hf))
    with torch.no_grad():
        hf.generate(input_ids=x, attention_mask=torch.ones_like(x), streamer=Streamer(),
                    **greedy(max_new_tokens, pad_id(tok, hf)))
    return out


def _max_positions(model: Any) -> int | None:
    cfg = getattr(getattr(model, "_module", model), "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(text, name, None)
        if isinstance(v, int):
            return v
    return None


def _token(tok: Any, prompt: list[int], out: list[int]) -> dict:
    """The newest token: id, vocabulary string and display text (decoded after the tokens before it)."""
    from attnflow.tokens import display_tokens

    t = out[-1]
    cut = max(0, len(out) - 8)  # the last 8 tokens hold any character split over several
    text = display_tokens(tok, out[cut:], context=(prompt + out[:cut])[-4:])[-1]
    return {"id": int(t), "token": str(tok.convert_ids_to_tokens([t])[0]), "text": text}


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:500]
