"""Train the demo model organism on the CPU: `python -m attnflow.demo.train [--out DIR] [--seed S]`.

The run is a fixed number of steps (`--steps`), so the weights depend only on the
seed and the settings, never on how fast the machine is; `--minutes` is a safety
cap that stops early (and says so in the model card).  The loss is the
cross-entropy of the answer tokens and the end token only (everything else in a
prompt is random facts the model cannot predict), with several questions asked
after each set of documents.  The number of documents grows over the first part
of training, and a fraction of the questions are two-hop.

A small routing loss (`--route-weight`) guides two heads towards the look-up
circuit: without it the model sat at the accuracy of guessing among the values
stated for the asked relation for thousands of steps, the plateau that precedes
induction-like heads.  See `routing_targets` and the model card.

    $ python -m attnflow.demo.train --out /tmp/demo-model --steps 300   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from pathlib import Path

import torch
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from attnflow.demo import task
from attnflow.demo.tokenizer import build_tokenizer

TRAIN_SEED_BASE = 10**6  # training batches use seeds >= 10**6; held-out evaluation uses small seeds
EVAL_SEED = 7  # the held-out set logged during training
REPORT_SEED = 2024  # the held-out sets of the model card (and of tests/test_demo_model.py)


def make_config(tok: PreTrainedTokenizerFast, args: argparse.Namespace) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=128,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        initializer_range=args.init_std,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def encode(
    tok: PreTrainedTokenizerFast, examples: list[task.Example], questions: int = 1, rng: random.Random | None = None
) -> dict[str, Tensor]:
    """Right-padded `<s> prompt answer </s>` with labels on the answer and `</s>` only.

    With `questions > 1`, up to `questions - 1` further questions about the same
    documents follow, each `question : ... answer : <value> </s>`, each labelled.
    """
    rows = []
    for ex in examples:
        ids = tok(task.render_prompt(ex)[0]).input_ids
        labels = [-100] * len(ids)
        qas = task.all_questions(ex)
        extra = (rng or random).sample(qas[1:], min(questions - 1, len(qas) - 1)) if questions > 1 else []
        for i, (question, answer) in enumerate([qas[0], *extra]):
            if i:
                asked = tok(f"question : {question}\nanswer :", add_special_tokens=False).input_ids
                ids, labels = ids + asked, labels + [-100] * len(asked)
            target = tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
            ids, labels = ids + target, labels + target
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tok.pad_token_id)
    label_ids = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labels) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        label_ids[i, : len(ids)] = torch.tensor(labels)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_ids}


@torch.no_grad()
def answer_accuracy(model, tok: PreTrainedTokenizerFast, examples: list[task.Example], batch_size: int = 100) -> float:
    """Fraction of examples whose greedy first answer token is the answer, and whose second is `</s>`."""
    correct = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        enc = tok([task.render_prompt(ex)[0] for ex in chunk], return_tensors="pt", padding=True)
        position_ids = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)
        first = model(**enc, position_ids=position_ids).logits[:, -1].argmax(-1)
        ids = torch.cat([enc.input_ids, first[:, None]], 1)
        mask = torch.cat([enc.attention_mask, torch.ones_like(first)[:, None]], 1)
        second = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        second = second.logits[:, -1].argmax(-1)
        gold = torch.tensor([tok.convert_tokens_to_ids(ex.answer) for ex in chunk])
        correct += int(((first == gold) & (second == tok.eos_token_id)).sum())
    return correct / len(examples)


NOUN_TO_PHRASE = {t.split()[3]: p.split() for p, t, _ in task.RELATIONS.values()}  # "city" -> ["lives", "in"]


def routing_targets(tok: PreTrainedTokenizerFast, input_ids: Tensor) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """Where the look-up circuit should attend, read off the token sequence of a training batch.

    Returns (copy, lookup, link, bridged), lists of (row, query position, key position):
    copy: at each document's value (`alice lives in PARIS .`) and at the `:` ending
    each question (`... of alice ? answer :`), the entity three tokens back;
    lookup: at a single-hop question's `:`, the value of the document that answers it;
    link, bridged: at a two-hop question's `:`, the last word of the "works with"
    document that names the colleague, and the value of the colleague's document.
    """
    names = tok.convert_ids_to_tokens(list(range(len(tok))))
    copy, lookup, link, bridged = [], [], [], []
    for b, ids in enumerate(input_ids.tolist()):
        words = [names[i] for i in ids]
        values, links = {}, {}  # (entity, relation words) -> value position; entity -> (colleague, link value position)
        for i in range(1, len(words) - 5):
            if words[i].startswith("doc") and words[i + 1] == ":":
                copy.append((b, i + 5, i + 2))
                values[words[i + 2], tuple(words[i + 3 : i + 5])] = i + 5
                if words[i + 3 : i + 5] == task.LINK.split():
                    links[words[i + 2]], links[words[i + 5]] = (words[i + 5], i + 5), (words[i + 2], i + 5)
            elif words[i] == "answer" and words[i + 1] == ":" and words[i - 1] == "?":
                j, entity = i + 1, words[i - 2]
                copy.append((b, j, j - 3))
                if words[j - 5] == "colleague" and entity in links:  # ... the city of the colleague of alice ?
                    colleague, at = links[entity]
                    phrase = tuple(NOUN_TO_PHRASE.get(words[j - 8], ()))
                    if (colleague, phrase) in values:
                        link.append((b, j, at)), bridged.append((b, j, values[colleague, phrase]))
                elif (entity, tuple(NOUN_TO_PHRASE.get(words[j - 5], ()))) in values:
                    lookup.append((b, j, values[entity, tuple(NOUN_TO_PHRASE[words[j - 5]])]))
    return copy, lookup, link, bridged


def routing_loss(attentions: tuple[Tensor, ...], targets: list[tuple[int, int, int]], layer: int, head: int) -> Tensor:
    """Mean -log of the attention head `head` of `layer` pays from each query to its target key."""
    if not targets:
        return attentions[layer].new_zeros(())
    rows, queries, keys = (torch.tensor(c) for c in zip(*targets))
    weights = attentions[layer][rows, head, queries, keys]
    return -torch.log(weights.clamp_min(1e-6)).mean()


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def docs_at(step: int, args: argparse.Namespace) -> tuple[int, int]:
    """Curriculum: the largest number of documents grows from 2 to the task's maximum over `--grow` of the run."""
    grown = min(1.0, step / max(1, args.grow * args.steps))
    high = 2 + round(grown * (args.max_docs - 2))
    return (min(2, args.min_docs), high) if high < args.max_docs else (args.min_docs, args.max_docs)


def batch_at(step: int, tok: PreTrainedTokenizerFast, args: argparse.Namespace) -> dict[str, Tensor]:
    low, high = docs_at(step, args)
    seed = TRAIN_SEED_BASE + args.seed * 100_003 + step
    mix = task.DISTRACTOR_MIX
    if args.hard_until and step < args.hard_until * args.steps:  # first: mostly the asked relation about others
        mix = (0.1, 0.85)
    examples = task.generate(args.batch, seed, two_hop=args.two_hop_frac, min_docs=low, max_docs=high, mix=mix)
    return encode(tok, examples, args.questions, random.Random(seed))


def train(args: argparse.Namespace) -> tuple[LlamaForCausalLM, dict]:
    """Train from scratch (or from `--init`); save to `--out` when given.  Returns (model in eval mode, log)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(args.threads)
        return _train(args)
    finally:
        torch.set_num_threads(threads)


def _train(args: argparse.Namespace) -> tuple[LlamaForCausalLM, dict]:
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tok = build_tokenizer()
    model = LlamaForCausalLM(make_config(tok, args))
    if args.init:  # continue from a trained folder (its architecture wins over the flags)
        model = LlamaForCausalLM.from_pretrained(args.init, local_files_only=True)
    if args.route_weight > 0:  # attention weights are needed for the routing loss
        model.config._attn_implementation = "eager"
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98),
    )
    held_out = task.generate(args.eval_n, EVAL_SEED, min_docs=args.min_docs, max_docs=args.max_docs)
    held_out_2 = task.generate(args.eval_n, EVAL_SEED + 1, two_hop=True, min_docs=args.min_docs, max_docs=args.max_docs)
    start, steps_done, log = time.time(), 0, []
    for step in range(args.steps):
        if args.minutes and time.time() - start > 60 * args.minutes:
            print(f"stopping at step {step}: --minutes {args.minutes} reached", flush=True)
            break
        model.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        batch = batch_at(step, tok, args)
        out = model(**batch, output_attentions=args.route_weight > 0)
        loss = out.loss
        if args.route_weight > 0:
            copy, lookup, link, bridged = routing_targets(tok, batch["input_ids"])
            route = routing_loss(out.attentions, copy, 0, 0) + routing_loss(out.attentions, lookup, 1, 0)
            if args.route_two_hop:
                route = route + routing_loss(out.attentions, link, 1, 1) + routing_loss(out.attentions, bridged, 2, 0)
            loss = loss + args.route_weight * route
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps_done = step + 1
        if steps_done % args.eval_every == 0 or steps_done == args.steps:
            model.eval()
            acc1, acc2 = answer_accuracy(model, tok, held_out), answer_accuracy(model, tok, held_out_2)
            log.append({"step": steps_done, "minutes": round((time.time() - start) / 60, 2), "loss": round(loss.item(), 4),
                        "single_hop": acc1, "two_hop": acc2, "docs": docs_at(step, args)})
            print(json.dumps(log[-1]), flush=True)
    model.config._attn_implementation = "sdpa"
    model.eval()
    result = {"steps_done": steps_done, "wall_minutes": round((time.time() - start) / 60, 1), "log": log}
    if args.out:
        save(model, tok, Path(args.out), args, result)
    return model, result


def save(model, tok: PreTrainedTokenizerFast, out: Path, args: argparse.Namespace, result: dict) -> None:
    """The HF folder (safetensors, tokenizer, generation config), training_log.json and MODEL_CARD.md, swapped in whole."""
    from transformers import GenerationConfig

    from attnflow import _io

    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        do_sample=False, max_new_tokens=2,
    )
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    meta = {"settings": settings, "torch": torch.__version__, "python": platform.python_version(), **result}
    meta["accuracy"] = measure(model, tok)
    with _io.atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "training_log.json").write_text(json.dumps(meta, indent=1) + "\n")
        (tmp / "MODEL_CARD.md").write_text(model_card(model, tok, meta))


def measure(model, tok: PreTrainedTokenizerFast) -> dict[str, float]:
    """Greedy accuracy on the model card's held-out sets, next to guessing among the stated values."""
    single, double = task.generate(200, REPORT_SEED), task.generate(200, REPORT_SEED + 1, two_hop=True)
    return {
        "single_hop": answer_accuracy(model, tok, single),
        "two_hop": answer_accuracy(model, tok, double),
        "single_hop_guess": sum(map(task.stated_value_chance, single)) / len(single),
        "two_hop_guess": sum(map(task.stated_value_chance, double)) / len(double),
    }


def refresh_card(out: Path) -> None:
    """Re-measure a trained folder and rewrite its training_log.json and MODEL_CARD.md (the weights are untouched)."""
    from transformers import AutoModelForCausalLM

    from attnflow import _io

    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(out, local_files_only=True)
    meta = json.loads((out / "training_log.json").read_text())
    meta["accuracy"] = measure(model, tok)
    _io.write_text(out / "training_log.json", json.dumps(meta, indent=1) + "\n")
    _io.write_text(out / "MODEL_CARD.md", model_card(model, tok, meta))


def _two_hop_routing(st: dict) -> str:
    if st.get("route_two_hop"):
        return ("\n  With `--route-two-hop 1` (used here), on two-hop questions head 1 of layer 1 is also guided from the `:` to"
                "\n  the last word of the `works with` document and head 0 of layer 2 to the value of the colleague's document."
                "\n  The other heads are not supervised.")
    return "  The other heads and every two-hop question are not supervised."


def _two_hop_note(acc: dict) -> str:
    uniform = 1 / len(next(iter(task.RELATIONS.values()))[2])
    if acc["two_hop"] >= acc["two_hop_guess"] + 0.05:
        return (f"Two-hop answers ({acc['two_hop']:.0%}) beat both the stated-value guess and a uniform guess "
                f"over the relation's values ({uniform:.0%}): the model composes the two documents on most questions.")
    return (f"Two-hop answers ({acc['two_hop']:.0%}) are far above a uniform guess over the relation's values "
            f"({uniform:.0%}) but not above the stated-value guess: the model finds the asked relation and often "
            "the colleague's value, yet it has not learnt the two-document composition reliably.")


def _rope(cfg) -> str:
    params = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", None)}
    return ", ".join(f"{k} {v}" for k, v in params.items() if v is not None)


def model_card(model, tok: PreTrainedTokenizerFast, meta: dict) -> str:
    cfg, st, acc = model.config, meta["settings"], meta["accuracy"]
    n_params = sum(p.numel() for p in model.parameters())
    last = meta["log"][-1] if meta["log"] else {}
    return f"""# attnflow demo model

A {cfg.num_hidden_layers}-layer Llama trained from scratch on the synthetic multi-document QA task of
`attnflow.demo.task`: every document states one fact (`alice lives in paris .`), a question asks for
one (entity, relation) pair (`what is the city of alice ?`) or, two-hop, for a fact about the colleague
of an entity (`what is the city of the colleague of alice ?` needs `alice works with bob .` and
`bob lives in rome .`).  The generator knows which documents support each answer, so attribution
methods can be scored against the truth.

## Accuracy (greedy, held-out seeds; training draws from seeds >= 10**6)

| questions | documents | examples | accuracy | guessing among the stated values |
|---|---|---|---|---|
| single-hop (seed {REPORT_SEED}) | {task.MIN_DOCS}-{task.DEFAULT_MAX_DOCS} | 200 | {acc["single_hop"]:.1%} | {acc["single_hop_guess"]:.1%} |
| two-hop (seed {REPORT_SEED + 1}) | {task.MIN_DOCS}-{task.DEFAULT_MAX_DOCS} | 200 | {acc["two_hop"]:.1%} | {acc["two_hop_guess"]:.1%} |

An answer counts when the first generated token is the answer and the second is `</s>`.  The last
column is the accuracy of a reader that knows which relation is asked but not whose: it picks
uniformly among the values the documents state for that relation (the single-hop set is the one
`tests/test_demo_model.py` checks).  {_two_hop_note(acc)}
The last training log line: `{json.dumps(last)}`.

## Architecture

LlamaForCausalLM: {cfg.num_hidden_layers} layers, hidden size {cfg.hidden_size}, MLP width {cfg.intermediate_size},
{cfg.num_attention_heads} query heads and {cfg.num_key_value_heads} key/value heads (grouped-query attention),
head size {cfg.hidden_size // cfg.num_attention_heads}, rotary position embeddings ({_rope(cfg)}),
RMSNorm, SwiGLU MLP, untied embeddings, {cfg.max_position_embeddings} positions, {n_params:,} parameters (float32).
Tokenizer: word level (`tokenizers` WordLevel, whitespace split), {len(tok)} tokens, `<s>` prepended, left padding.

## Task settings

{len(task.ENTITIES)} entities, {len(task.RELATIONS)} relations with {len(next(iter(task.RELATIONS.values()))[2])} values each,
plus the symmetric link `works with`; {task.MIN_DOCS}-{task.DEFAULT_MAX_DOCS} documents per prompt, one fact each.
Distractors mostly state the asked relation about other people, or other relations of the people in the question;
no (entity, relation) pair is stated twice, so every question has exactly one supported answer.

## Training

`python -m attnflow.demo.train --out src/attnflow/demo/model {" ".join(f"--{k.replace('_', '-')} {v}" for k, v in st.items() if v is not None)}`

- seed {st["seed"]}; {meta["steps_done"]} steps of {st["batch"]} prompts; each prompt is followed by up to {st["questions"]}
  questions about its documents, and the loss is the cross-entropy of the answer tokens and `</s>` only.
- {st["two_hop_frac"]:.0%} of the prompts' first questions are two-hop; the number of documents grows from 2 to
  {st["max_docs"]} over the first {st["grow"]:.0%} of the steps.
- Routing loss, weight {st.get("route_weight", 0)}: the mean -log attention that head 0 of layer 0 pays from every
  document's value token (`alice lives in PARIS`) and from every question's final `:` to the entity three tokens
  back, plus the same for head 0 of layer 1 from a single-hop question's `:` to the value token of the supporting
  document.  Without it (weight 0) the model stayed at the accuracy of guessing among the stated values of the
  asked relation (about 50%) for more than 5,000 steps.  **For attribution studies this matters:** one head of
  layer 1 was trained to attend to the supporting document on single-hop questions, so attention-based attribution
  finds that document more easily than it would in a model that learnt the look-up unaided.{_two_hop_routing(st)}
- AdamW (betas 0.9, 0.98, weight decay {st["weight_decay"]} on matrices), peak learning rate {st["lr"]},
  {st["warmup"]} warm-up steps then cosine decay to 5%, gradient clipping at 1.0.
- CPU, {st["threads"]} torch thread(s), torch {meta["torch"]}, Python {meta["python"]}; wall time {meta["wall_minutes"]} minutes
  (on a CPU shared with other jobs).
- The run is a fixed number of steps with batches drawn from seeded generators, so the same command
  reproduces the weights on the same software (floating-point results can differ across torch versions and thread counts).

`training_log.json` holds the settings and the held-out accuracy logged during training.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m attnflow.demo.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="directory for the trained HF folder (default: do not save)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--minutes", type=float, default=None, help="stop early after this many minutes (not reproducible)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--ffn", type=int, default=128, help="MLP width")
    p.add_argument("--init-std", type=float, default=0.02, help="standard deviation of the initial weights")
    p.add_argument("--min-docs", type=int, default=task.MIN_DOCS)
    p.add_argument("--max-docs", type=int, default=task.DEFAULT_MAX_DOCS)
    p.add_argument("--grow", type=float, default=0.3, help="fraction of the run over which documents grow to --max-docs")
    p.add_argument("--hard-until", type=float, default=0.0,
                   help="fraction of the run whose distractors mostly state the asked relation about other people")
    p.add_argument("--route-weight", type=float, default=0.1,
                   help="weight of the routing loss that guides head 0 of layers 0 and 1 (see routing_targets)")
    p.add_argument("--route-two-hop", type=int, default=1,
                   help="1: also guide head 1 of layer 1 and head 0 of layer 2 on two-hop questions")
    p.add_argument("--two-hop-frac", type=float, default=0.2)
    p.add_argument("--questions", type=int, default=6, help="questions asked after each set of documents in training")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--init", default=None, help="start from the weights of this trained folder instead of random ones")
    p.add_argument("--card", default=None, help="only re-measure the trained folder DIR and rewrite its model card")
    return p


if __name__ == "__main__":
    _args = parser().parse_args()
    refresh_card(Path(_args.card)) if _args.card else train(_args)
