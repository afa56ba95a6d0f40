"""Bytes a remote recording sends back: every head and row vs heads="mean", rows="completion".

    python bench/remote.py                 # through the loopback NDIF mock (tests/ndif_mock), as sent on the wire
    python bench/remote.py --via local     # nnsight's local round trip; result bytes as NDIF would store them
    python bench/remote.py --seq 2048 --layers 8 --heads 16
    python bench/remote.py --generate 16   # a remote generation: one pass vs two passes (mock)

A small random Llama (float32 weights, GQA) reads one prompt of `seq - 16`
token ids followed by a 16-token completion (teacher forcing), `seq` tokens in
all.  Each row of the table is one `attnflow.trace(..., remote=...)` call,
float16 storage:

    shape      the patterns that come back: batch layer head query key
    raw        their size in memory (float16)
    result     bytes of the result blob (torch.save of the saved values, zstd-compressed
               as NDIF compresses it when the request asked for compression, nnsight's default)
    request    bytes of the serialised request (the trace block, its inputs, attnflow's
               registered helpers); the same for both rows
    route      how the result came back (mock): inline on the websocket, or, above the
               inline cap (8 MiB, NDIF's default from Redis's pubsub limits), from the
               object store by URL
    seconds    wall time of the call

The mock has no auth, like an `ndif` server without Postgres: no API key is set.

The ratio is result(all) / result(mean, completion): O(layers·heads·seq²) against
O(layers·rows·seq), because the reduction runs on the server, inside the trace.

`--generate N` instead greedily generates N tokens after a `seq`-token prompt,
heads="mean", rows=None, through the mock, twice per repeat, interleaved: the
default (recorded while generating, one request per batch) and `one_pass=False`
(a generation request, then a forward request over prompt + completion).  It
prints the requests, the bytes sent each way, the median seconds and the
model forwards the server ran (prefill and decode steps vs a full second
forward), checks both give the local run's tokens, and prints the patterns' max
difference between the two, and between the remote one pass and a local one.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models, ndif_mock

import attnflow as af  # noqa: E402

COMPLETION = 16
REPO = "attnflow-bench/small-llama"


def small_model(seq: int, layers: int, heads: int, **config):
    from tiny_models import tiny_model

    return tiny_model(
        "llama", num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
        hidden_size=16 * heads, max_position_embeddings=seq, **config,
    )


def zstd_bytes(value: torch.Tensor) -> int:
    """What NDIF stores for a saved tensor: torch.save of the saves dict, zstd level 3."""
    import zstandard

    buffer = io.BytesIO()
    torch.save({"patterns": value}, buffer)
    return len(zstandard.ZstdCompressor(level=3).compress(buffer.getvalue()))


CONFIGS = [("all", None), ("mean", "completion")]


@contextmanager
def mock_ndif(model_dir: str) -> Iterator:
    """The loopback NDIF mock serving `model_dir` as REPO, nnsight's client pointed at it with no API key."""
    import nnsight
    from ndif_mock import serve
    from nnsight.modeling import huggingface as nnsight_hf

    nnsight_hf._ID_CACHE[model_dir] = REPO  # the hub's canonical id for this directory, answered offline
    nnsight.CONFIG.APP.REMOTE_LOGGING = False
    os.environ.pop("NDIF_API_KEY", None)
    nnsight.CONFIG.API.APIKEY = None
    with serve(model_dir, REPO) as mock:
        nnsight.CONFIG.API.HOST = mock.url
        yield mock


def run(via: str, seq: int, layers: int, heads: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, 100, (seq - COMPLETION,), generator=g).tolist()
    completion = torch.randint(4, 100, (COMPLETION,), generator=g).tolist()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from tiny_models import tiny_tokenizer

        small_model(seq, layers, heads).save_pretrained(tmp)
        tiny_tokenizer().save_pretrained(tmp)
        model = af.load(tmp)
        if via == "local":
            for head_mode, row_mode in CONFIGS:
                t = time.perf_counter()
                tr = af.trace(model, [prompt], completions=[completion], heads=head_mode, rows=row_mode,
                              remote="local", progress=False)
                rows.append(dict(heads=head_mode, rows=row_mode, shape=tuple(tr.patterns.shape), raw=tr.patterns.nbytes,
                                 result=zstd_bytes(tr.patterns), request=None, seconds=time.perf_counter() - t))
            return rows

        with mock_ndif(tmp) as mock:
            for head_mode, row_mode in CONFIGS:
                t = time.perf_counter()
                tr = af.trace(model, [prompt], completions=[completion], heads=head_mode, rows=row_mode,
                              remote=True, progress=False)
                job = mock.stats()[-1]
                rows.append(dict(heads=head_mode, rows=row_mode, shape=tuple(tr.patterns.shape), raw=tr.patterns.nbytes,
                                 result=job["result_bytes"], request=job["request_bytes"],
                                 route="inline" if job["inline"] else "object store",
                                 seconds=time.perf_counter() - t))
    return rows


def run_generate(seq: int, layers: int, heads: int, new: int, repeats: int) -> list[dict]:
    import statistics

    from tiny_models import tiny_tokenizer

    prompt = torch.randint(4, 100, (seq,), generator=torch.Generator().manual_seed(0)).tolist()
    kw = dict(max_new_tokens=new, heads="mean", rows=None, remote=True, progress=False, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        small_model(seq + new + 1, layers, heads, eos_token_id=None).save_pretrained(tmp)  # all N tokens every run
        tiny_tokenizer().save_pretrained(tmp)
        model = af.load(tmp)
        with mock_ndif(tmp) as mock:
            for one_pass in (True, False):  # warm-up, untimed: the server's first request sets up its tracing
                af.trace(model, [prompt], one_pass=one_pass, **kw)
            runs = {True: [], False: []}
            traces = {}
            for _ in range(repeats):
                for one_pass in (True, False):
                    before = len(mock.stats())
                    t = time.perf_counter()
                    traces[one_pass] = af.trace(model, [prompt], one_pass=one_pass, **kw)
                    runs[one_pass].append((time.perf_counter() - t, mock.stats()[before:]))
        local = af.trace(model, [prompt], **dict(kw, remote=False))  # the local default, in this process
    one, two = traces[True], traces[False]
    assert one.input_ids.tolist() == two.input_ids.tolist() == local.input_ids.tolist()
    diff = (one.patterns - two.patterns).abs().max().item()
    exact = (one.patterns - local.patterns).abs().max().item()
    rows = []
    for one_pass in (True, False):
        jobs = runs[one_pass][-1][1]
        rows.append(dict(
            name="one pass (default)" if one_pass else "one_pass=False", requests=len(jobs),
            sent=sum(j["request_bytes"] for j in jobs), returned=sum(j["result_bytes"] for j in jobs),
            forwards=sum(j["forwards"] for j in jobs), tokens=sum(j["tokens"] for j in jobs),
            seconds=statistics.median(s for s, _ in runs[one_pass]), diff=diff, exact=exact,
        ))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--via", choices=("mock", "local"), default="mock")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--generate", type=int, default=0, metavar="N", help="generate N tokens: one pass vs two passes")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.generate:
        rows = run_generate(args.seq, args.layers, args.heads, args.generate, args.repeats)
        print(f"small Llama: {args.layers} layers x {args.heads} heads, {args.seq}-token prompt, generate {args.generate}, "
              f'heads="mean", every row, float32, through the mock; median of {args.repeats} interleaved runs')
        print(f"{'recording':<20} {'requests':>8} {'request bytes':>14} {'bytes returned':>15} {'forwards':>9} "
              f"{'tokens run':>11} {'seconds':>8}")
        for r in rows:
            print(f"{r['name']:<20} {r['requests']:>8} {r['sent']:>14,} {r['returned']:>15,} {r['forwards']:>9} "
                  f"{r['tokens']:>11,} {r['seconds']:>8.2f}")
        one, two = rows
        print(f"ratio  two passes / one pass: {two['seconds'] / one['seconds']:.2f}x seconds, "
              f"{two['tokens'] / one['tokens']:.2f}x token positions run")
        print(f"max abs diff: one pass vs two passes {one['diff']:.1e}; remote one pass vs local one pass {one['exact']}")
        return
    rows = run(args.via, args.seq, args.layers, args.heads)
    print(f"small Llama: {args.layers} layers x {args.heads} heads, seq {args.seq} "
          f"({args.seq - COMPLETION} prompt + {COMPLETION} completion), float16 storage, via {args.via}")
    print(f"{'heads':<6} {'rows':<11} {'shape':<24} {'raw bytes':>12} {'result bytes':>13} {'request bytes':>14} "
          f"{'route':<13} {'seconds':>8}")
    for r in rows:
        request = "-" if r["request"] is None else f"{r['request']:,}"
        print(f"{r['heads']:<6} {str(r['rows'] or 'all'):<11} {str(r['shape']):<24} {r['raw']:>12,} {r['result']:>13,} "
              f"{request:>14} {r.get('route', '-'):<13} {r['seconds']:>8.2f}")
    full, small = rows
    print(f"ratio  result(all) / result(mean, completion) = {full['result'] / small['result']:,.0f}x "
          f"(raw: {full['raw'] / small['raw']:,.0f}x)")


if __name__ == "__main__":
    main()
