"""Every bad input is a one-line `attnflow.errors` exception naming the problem (issue 17); CLI: exit 2, one stderr line.

Each case is a bad input through the Python API (`API`) or the command line (`CLI`, run in-process
through `attnflow.cli.main`).  An API case asserts the error class and that the message names the
problem; a CLI case asserts exit code 2 and exactly one stderr line naming it.  Any exception that is
not an `attnflow.errors.AttnflowError` is a raw traceback: `test_no_raw_tracebacks` counts them (0).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch
from test_parquet import make_trace
from tiny_models import tiny_model, tiny_tokenizer, write_gguf

import attnflow as af
from attnflow import cli
from attnflow.attention_trace import AttentionTrace
from attnflow.errors import (
    AttnflowError,
    BadArgumentError,
    DataError,
    ModelNotFoundError,
    NonFiniteError,
    PromptError,
    ShapeError,
    StorageError,
    UnsupportedModelError,
)
from attnflow.eval.config import RunConfig
from attnflow.eval import store
from attnflow.eval.datasets import load_hotpotqa
from attnflow.exporters import to_html, to_parquet

RAW: list[str] = []  # ids of the cases that gave a raw traceback (filled as the cases run)


# --- what the cases run on -----------------------------------------------------------------------
class Ctx:
    """Model folders, a loaded tiny model, traces, patterns and a scratch folder, built once."""

    def __init__(self, root: Path):
        self.root = root
        self.llama = root / "llama"
        tiny_model("llama").save_pretrained(self.llama)
        tiny_tokenizer().save_pretrained(self.llama)
        self.no_tokenizer = root / "no-tokenizer"
        tiny_model("llama").save_pretrained(self.no_tokenizer)
        self.not_model = root / "notes"
        self.not_model.mkdir()
        (self.not_model / "notes.txt").write_text("not a model\n")
        self.truncated = root / "truncated"
        shutil.copytree(self.llama, self.truncated)
        weights = (self.truncated / "model.safetensors").read_bytes()
        (self.truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
        self.unknown = root / "unknown-type"
        shutil.copytree(self.llama, self.unknown)
        cfg = json.loads((self.unknown / "config.json").read_text())
        (self.unknown / "config.json").write_text(json.dumps({**cfg, "model_type": "bogusformer"}))
        self.bad_config = root / "bad-config"
        shutil.copytree(self.llama, self.bad_config)
        (self.bad_config / "config.json").write_text("{not json")
        self.unknown_gguf = write_gguf(str(root / "mamba.gguf"))
        data = Path(write_gguf(str(root / "full.gguf"), arch="llama")).read_bytes()
        self.truncated_gguf = root / "truncated.gguf"
        self.truncated_gguf.write_bytes(data[: len(data) // 3])
        self.file = root / "a-file"
        self.file.write_text("mine\n")
        self.model = af.load(self.llama)
        self.tr = make_trace([5, 3], layers=(0, 1, 2, 3))  # every row and layer; 2 completion tokens per example
        self.saved = make_trace([4, 3]).save(root / "saved")
        A = torch.rand(2, 3, 2, 5, 5).tril()
        self.A = A / A.sum(-1, keepdim=True)  # batch layer head query key, rows sum to 1
        self.n = 0

    def out(self) -> Path:
        """A fresh, not yet existing output path."""
        self.n += 1
        return self.root / "out" / str(self.n)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return Ctx(tmp_path_factory.mktemp("bad"))


def bad_rows(A, total=5.0):
    """`A` with example 0's query row 2 of layer 1 summing to `total`."""
    A = A.clone()
    A[0, 1, :, 2] *= total
    return A


def accumulate(A):
    """Rollout layer by layer through a FlowAccumulator (the check is raised by `result`)."""
    acc = af.flow.FlowAccumulator("rollout")
    for l in range(A.shape[1]):
        acc.add(A[:, l])
    return acc.result()


def negative(A):
    A = A.clone()
    A[1, 0, 0, 3, :2] = torch.tensor([1.5, -0.5])
    return A


def nan(A):
    A = A.clone()
    A[0, 2, 1, 4, 0] = float("nan")
    return A


def read_only(ctx, monkeypatch, code=errno.EACCES):
    """A folder nothing can be created in: mode 0o555, and (for root, whom modes do not stop) mkdir/mkdtemp failing."""
    d = ctx.out()
    d.mkdir(parents=True)
    d.chmod(0o555)
    real_mkdtemp = tempfile.mkdtemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == d:
            raise OSError(code, os.strerror(code), str(d))
        return real_mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    return d / "run"


def disk_full(monkeypatch):
    """Every write of a Parquet file fails with ENOSPC, as on a full disk."""
    import pyarrow.parquet as pq

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full)


def no_server(monkeypatch):
    """`serve` must fail before it listens: a server that starts fails the case instead of running forever."""
    import uvicorn

    def started(*args, **kwargs):
        raise RuntimeError("the explorer started serving")

    monkeypatch.setattr(uvicorn.Server, "run", started)


def offline_hub(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


# id -> (call(ctx, monkeypatch), error class, words the message must hold)
API = {
    # --- TraceOptions / trace -------------------------------------------------------------------
    "trace max_new_tokens=True": (lambda c, m: af.trace(c.model, "the cat", max_new_tokens=True), BadArgumentError, "max_new_tokens=True"),
    "trace max_new_tokens=-1": (lambda c, m: af.trace(c.model, "the cat", max_new_tokens=-1), BadArgumentError, "max_new_tokens=-1"),
    "trace max_new_tokens=1.5": (lambda c, m: af.trace(c.model, "the cat", max_new_tokens=1.5), BadArgumentError, "max_new_tokens=1.5"),
    "trace heads='bogus'": (lambda c, m: af.trace(c.model, "the cat", heads="bogus"), BadArgumentError, "heads='bogus'"),
    "trace rows=[0.5]": (lambda c, m: af.trace(c.model, "the cat", rows=[0.5]), BadArgumentError, "rows=[0.5]"),
    "trace rows=[True]": (lambda c, m: af.trace(c.model, "the cat", rows=[True]), BadArgumentError, "rows=[True]"),
    "trace rows=[99]": (lambda c, m: af.trace(c.model, "the cat", rows=[99]), BadArgumentError, "out of range"),
    "trace rows='first'": (lambda c, m: af.trace(c.model, "the cat", rows="first"), BadArgumentError, "rows='first'"),
    "trace layers=[0.5]": (lambda c, m: af.trace(c.model, "the cat", layers=[0.5]), BadArgumentError, "0.5"),
    "trace layers=[9]": (lambda c, m: af.trace(c.model, "the cat", layers=[9]), BadArgumentError, "layer 9"),
    "trace layers='all'": (lambda c, m: af.trace(c.model, "the cat", layers="all"), BadArgumentError, "layers='all'"),
    "trace dtype='int8'": (lambda c, m: af.trace(c.model, "the cat", dtype="int8"), BadArgumentError, "dtype='int8'"),
    "trace dtype=torch.int8": (lambda c, m: af.trace(c.model, "the cat", dtype=torch.int8), BadArgumentError, "dtype=torch.int8"),
    "trace batch_size=0": (lambda c, m: af.trace(c.model, "the cat", batch_size=0), BadArgumentError, "batch_size=0"),
    "trace batch_size='8'": (lambda c, m: af.trace(c.model, "the cat", batch_size="8"), BadArgumentError, "batch_size='8'"),
    "trace memory_budget='lots'": (lambda c, m: af.trace(c.model, "the cat", memory_budget="lots"), BadArgumentError, "memory_budget='lots'"),
    "trace memory_budget=-5": (lambda c, m: af.trace(c.model, "the cat", memory_budget=-5), BadArgumentError, "memory_budget=-5"),
    "trace memory_budget=[1]": (lambda c, m: af.trace(c.model, "the cat", memory_budget=[1]), BadArgumentError, "memory_budget=[1]"),
    "trace memory_budget=1.5e9": (lambda c, m: af.trace(c.model, "the cat", memory_budget=float("nan")), BadArgumentError, "memory_budget=nan"),
    "trace remote='http://'": (lambda c, m: af.trace(c.model, "the cat", remote="http://ndif.example"), BadArgumentError, "http://"),
    "trace progress='no'": (lambda c, m: af.trace(c.model, "the cat", progress="no"), BadArgumentError, "progress='no'"),
    "trace one_pass=1": (lambda c, m: af.trace(c.model, "the cat", one_pass=1), BadArgumentError, "one_pass=1"),
    "trace unknown keyword": (lambda c, m: af.trace(c.model, "the cat", max_tokens=3), BadArgumentError, "max_tokens"),
    "trace options='fast'": (lambda c, m: af.trace(c.model, "the cat", options="fast"), BadArgumentError, "options"),
    "trace empty prompt": (lambda c, m: af.trace(c.model, "  "), PromptError, "empty"),
    "trace prompt=5": (lambda c, m: af.trace(c.model, 5), PromptError, "int"),
    "trace prompt too long": (lambda c, m: af.trace(c.model, " ".join(["cat"] * 80)), PromptError, "at most 64 positions"),
    "trace a string model": (lambda c, m: af.trace("llama", "the cat"), UnsupportedModelError, "str"),
    "trace rows='completion' w/o one": (lambda c, m: af.trace(c.model, "the cat", rows="completion"), BadArgumentError, "completion"),
    "trace head weights shape": (lambda c, m: af.trace(c.model, "the cat", heads=torch.ones(3, 3)), BadArgumentError, "shape (3, 3)"),
    "trace negative head weights": (lambda c, m: af.trace(c.model, "the cat", heads=-torch.ones(2, 4)), BadArgumentError, "non-negative"),
    "trace completions count": (lambda c, m: af.trace(c.model, ["the cat", "a dog"], completions=["sat"]), BadArgumentError, "1 completions for 2"),
    "trace spans of a str": (lambda c, m: af.trace(c.model, "the cat", spans=[["doc"]]), BadArgumentError, "Span"),
    # --- load: model folders and hub ids --------------------------------------------------------------
    "load missing folder": (lambda c, m: af.load(c.root / "nowhere"), ModelNotFoundError, "nowhere"),
    "load a file": (lambda c, m: af.load(c.file), ModelNotFoundError, "a-file"),
    "load not a model": (lambda c, m: af.load(c.not_model), ModelNotFoundError, "notes"),
    "load no tokenizer": (lambda c, m: af.load(c.no_tokenizer), ModelNotFoundError, "tokenizer"),
    "load truncated safetensors": (lambda c, m: af.load(c.truncated), DataError, "model.safetensors"),
    "load unknown model type": (lambda c, m: af.load(c.unknown), UnsupportedModelError, "bogusformer"),
    "load config not JSON": (lambda c, m: af.load(c.bad_config), DataError, "config.json"),
    "load unknown GGUF architecture": (lambda c, m: af.load(c.unknown_gguf), UnsupportedModelError, "mamba3x"),
    "load truncated GGUF": (lambda c, m: af.load(c.truncated_gguf), DataError, "truncated.gguf"),
    "load dtype='int8'": (lambda c, m: af.load(c.llama, dtype="int8"), BadArgumentError, "dtype='int8'"),
    "load dtype='float17'": (lambda c, m: af.load(c.llama, dtype="float17"), BadArgumentError, "dtype='float17'"),
    "load path=5": (lambda c, m: af.load(5), BadArgumentError, "path_or_id=5"),
    "load hub id, HF_HUB_OFFLINE=1": (
        lambda c, m: (m.setenv("HF_HUB_OFFLINE", "1"), af.load("nobody-org/no-such-model"))[1], ModelNotFoundError, "not found locally",
    ),
    "load hub id, offline unset": (
        lambda c, m: (offline_hub(m), af.load("nobody-org/no-such-model"))[1], ModelNotFoundError, "no network use",
    ),
    # --- flow functions ------------------------------------------------------------------------
    "rollout alpha='x'": (lambda c, m: af.flow.rollout(c.A, alpha="x"), BadArgumentError, "alpha='x'"),
    "rollout alpha=2": (lambda c, m: af.flow.rollout(c.A, alpha=2), BadArgumentError, "alpha=2"),
    "rollout alpha=nan": (lambda c, m: af.flow.rollout(c.A, alpha=float("nan")), BadArgumentError, "alpha=nan"),
    "rollout rows=[0.5]": (lambda c, m: af.flow.rollout(c.A, rows=[0.5]), BadArgumentError, "rows"),
    "rollout rows=[True]": (lambda c, m: af.flow.rollout(c.A, rows=[True]), BadArgumentError, "rows"),
    "rollout rows=[9]": (lambda c, m: af.flow.rollout(c.A, rows=[9]), BadArgumentError, "rows"),
    "rollout rows float tensor": (lambda c, m: af.flow.rollout(c.A, rows=torch.tensor([0.5])), BadArgumentError, "rows"),
    "rollout rows='last'": (lambda c, m: af.flow.rollout(c.A, rows="last"), BadArgumentError, "rows='last'"),
    "rollout exclude_keys=('a',)": (lambda c, m: af.flow.rollout(c.A, exclude_keys=("a",)), BadArgumentError, "exclude_keys"),
    "rollout exclude_keys=(0.5,)": (lambda c, m: af.flow.rollout(c.A, exclude_keys=(0.5,)), BadArgumentError, "exclude_keys"),
    "rollout exclude_keys=(9,)": (lambda c, m: af.flow.rollout(c.A, exclude_keys=(9,)), BadArgumentError, "exclude_keys"),
    "rollout exclude_keys=3": (lambda c, m: af.flow.rollout(c.A, exclude_keys=3), BadArgumentError, "exclude_keys"),
    "rollout heads='bogus'": (lambda c, m: af.flow.rollout(c.A, heads="bogus"), BadArgumentError, "heads='bogus'"),
    "rollout of a list": (lambda c, m: af.flow.rollout([[0.5]]), BadArgumentError, "torch.Tensor"),
    "rollout rows summing to 5": (lambda c, m: af.flow.rollout(bad_rows(c.A)), DataError, "sum"),
    "rollout rows summing to 0.5": (lambda c, m: af.flow.rollout(bad_rows(c.A, 0.5)), DataError, "sum"),
    "residual_flow negative weights": (lambda c, m: af.flow.residual_flow(negative(c.A)), DataError, "negative"),
    "total_attention NaN": (lambda c, m: af.flow.total_attention(nan(c.A)), NonFiniteError, "layer 2"),
    "rollout key_mask shape": (lambda c, m: af.flow.rollout(c.A, key_mask=torch.ones(2, 4)), ShapeError, "key_mask"),
    "compose method='bogus'": (lambda c, m: af.flow.compose(c.A, "bogus"), BadArgumentError, "method='bogus'"),
    "raw layer=9": (lambda c, m: af.flow.raw(c.A, layer=9), BadArgumentError, "layer=9"),
    "raw layer=1.5": (lambda c, m: af.flow.raw(c.A, layer=1.5), BadArgumentError, "layer=1.5"),
    "raw rows summing to 5": (lambda c, m: af.flow.raw(bad_rows(c.A), layer=1), DataError, "sum"),
    "residual_flow normalize='yes'": (lambda c, m: af.flow.residual_flow(c.A, normalize="yes"), BadArgumentError, "normalize='yes'"),
    "max_flow alpha='x'": (lambda c, m: af.flow.max_flow(c.A, rows=[-1], alpha="x"), BadArgumentError, "alpha='x'"),
    "max_flow rows summing to 5": (lambda c, m: af.flow.max_flow(bad_rows(c.A), rows=[-1]), DataError, "sum"),
    "max_flow bits='x'": (lambda c, m: af.flow.max_flow(c.A, rows=[-1], bits="x"), BadArgumentError, "bits='x'"),
    "FlowAccumulator alpha='x'": (lambda c, m: af.flow.FlowAccumulator("rollout", alpha="x"), BadArgumentError, "alpha='x'"),
    "FlowAccumulator row sums": (lambda c, m: accumulate(bad_rows(c.A)), DataError, "layer 1 sum to 5"),
    "measured_rollout norms": (
        lambda c, m: af.flow.measured_rollout(c.A, -torch.ones(2, 3, 5), torch.ones(2, 3, 5)), BadArgumentError, "non-negative",
    ),
    # --- attribute ----------------------------------------------------------------------------------
    "attribute method='bogus'": (lambda c, m: af.attribute(c.tr, method="bogus"), BadArgumentError, "method='bogus'"),
    "attribute targets=['x']": (lambda c, m: af.attribute(c.tr, targets=["x"]), BadArgumentError, "targets"),
    "attribute targets=[0.5]": (lambda c, m: af.attribute(c.tr, targets=[0.5]), BadArgumentError, "targets"),
    "attribute targets=[True]": (lambda c, m: af.attribute(c.tr, targets=[True]), BadArgumentError, "targets"),
    "attribute targets=[99]": (lambda c, m: af.attribute(c.tr, targets=[99]), BadArgumentError, "target position 99"),
    "attribute targets=7": (lambda c, m: af.attribute(c.tr, targets=7), BadArgumentError, "targets=7"),
    "attribute alpha='x'": (lambda c, m: af.attribute(c.tr, method="rollout", alpha="x"), BadArgumentError, "alpha='x'"),
    "attribute alpha=2": (lambda c, m: af.attribute(c.tr, method="rollout", alpha=2), BadArgumentError, "alpha=2"),
    "attribute exclude_keys=('a',)": (lambda c, m: af.attribute(c.tr, exclude_keys=("a",)), BadArgumentError, "'a'"),
    "attribute exclude_keys=(99,)": (lambda c, m: af.attribute(c.tr, exclude_keys=(99,)), BadArgumentError, "99"),
    "attribute exclude_keys=(0.5,)": (lambda c, m: af.attribute(c.tr, exclude_keys=(0.5,)), BadArgumentError, "0.5"),
    "attribute reduce='median'": (lambda c, m: af.attribute(c.tr, reduce="median"), BadArgumentError, "median"),
    "attribute sources='docs'": (lambda c, m: af.attribute(c.tr, sources="docs"), BadArgumentError, "sources='docs'"),
    "attribute heads='bogus'": (lambda c, m: af.attribute(c.tr, heads="bogus"), BadArgumentError, "heads='bogus'"),
    "attribute span_kind='chapter'": (lambda c, m: af.attribute(c.tr, span_kind="chapter"), BadArgumentError, "span_kind='chapter'"),
    "attribute shares='yes'": (lambda c, m: af.attribute(c.tr, shares="yes"), BadArgumentError, "shares='yes'"),
    "attribute of a dict": (lambda c, m: af.attribute({"patterns": 1}), BadArgumentError, "AttentionTrace"),
    # --- exporters, save and load ----------------------------------------------------------------------
    "to_html shard_bytes='big'": (lambda c, m: to_html(c.tr, c.out(), shard_bytes="big"), BadArgumentError, "shard_bytes='big'"),
    "to_html precision='int4'": (lambda c, m: to_html(c.tr, c.out(), precision="int4"), BadArgumentError, "precision='int4'"),
    "to_html flow={'rollout': 'x'}": (lambda c, m: to_html(c.tr, c.out(), flow={"rollout": "x"}), BadArgumentError, "rollout"),
    "to_html overwrite='yes'": (lambda c, m: to_html(c.tr, c.out(), overwrite="yes"), BadArgumentError, "overwrite='yes'"),
    "to_html path=5": (lambda c, m: to_html(c.tr, 5), BadArgumentError, "path"),
    "to_html of a dict": (lambda c, m: to_html({}, c.out()), BadArgumentError, "AttentionTrace"),
    "to_parquet flow=[1, 2]": (lambda c, m: to_parquet(c.tr, c.out(), flow=[1, 2]), BadArgumentError, "flow"),
    "to_parquet attributions=5": (lambda c, m: to_parquet(c.tr, c.out(), attributions=5), BadArgumentError, "attributions"),
    "to_parquet into a file": (lambda c, m: to_parquet(c.tr, c.file), DataError, "a-file"),
    "save into a read-only folder": (lambda c, m: c.tr.save(read_only(c, m)), StorageError, "Permission denied [EACCES]"),
    "to_html on a read-only disk": (lambda c, m: to_html(c.tr, read_only(c, m, errno.EROFS)), StorageError, "read-only"),
    "save on a full disk": (lambda c, m: (disk_full(m), c.tr.save(c.out()))[1], StorageError, "No space left on device [ENOSPC]"),
    "save path=None": (lambda c, m: c.tr.save(None), BadArgumentError, "path"),
    "load a missing trace": (lambda c, m: AttentionTrace.load(c.root / "nowhere"), DataError, "nowhere"),
    "load a file as a trace": (lambda c, m: AttentionTrace.load(c.file), DataError, "a-file"),
    "load a model folder as a trace": (lambda c, m: AttentionTrace.load(c.llama), DataError, "manifest"),
    # --- eval and serve -------------------------------------------------------------------------------
    "RunConfig task='squad'": (lambda c, m: RunConfig(task="squad"), BadArgumentError, "task='squad'"),
    "RunConfig batch_size=0": (lambda c, m: RunConfig(task="demo", batch_size=0), BadArgumentError, "batch_size=0"),
    "RunConfig dtype='int8'": (lambda c, m: RunConfig(task="demo", dtype="int8"), BadArgumentError, "dtype='int8'"),
    "RunConfig limit=True": (lambda c, m: RunConfig(task="demo", limit=True), BadArgumentError, "limit=True"),
    "RunConfig mode='sample'": (lambda c, m: RunConfig(task="demo", mode="sample"), BadArgumentError, "mode='sample'"),
    "RunConfig shard='5/2'": (lambda c, m: RunConfig(task="demo", shard="5/2"), BadArgumentError, "5/2"),
    "serve host 0.0.0.0": (lambda c, m: af.serve(host="0.0.0.0", open_browser=False), BadArgumentError, "0.0.0.0"),
    "serve port='x'": (lambda c, m: af.serve(port="x", open_browser=False), BadArgumentError, "port='x'"),
    "serve port=70000": (lambda c, m: af.serve(port=70000, open_browser=False), BadArgumentError, "port=70000"),
    "serve models_dir missing": (lambda c, m: af.serve(models_dir=c.root / "nowhere", open_browser=False), ModelNotFoundError, "nowhere"),
    "serve limits='x'": (lambda c, m: af.serve(limits="x", open_browser=False), BadArgumentError, "limits"),
}


@pytest.mark.parametrize("case", list(API))
def test_api(case, ctx, monkeypatch):
    call, cls, words = API[case]
    no_server(monkeypatch)
    try:
        call(ctx, monkeypatch)
    except AttnflowError as err:
        assert isinstance(err, cls), f"{case}: {type(err).__name__} ({err}), expected {cls.__name__}"
        message = str(err)
        assert "\n" not in message, f"{case}: a message of several lines: {message!r}"
        assert words.lower() in message.lower(), f"{case}: {message!r} does not name {words!r}"
    except BaseException as err:
        RAW.append(case)
        raise AssertionError(f"{case}: raw traceback {type(err).__name__}: {err}") from err
    else:
        raise AssertionError(f"{case}: no error")


# --- the command line ------------------------------------------------------------------------------
# id -> (argv, with {llama}, {file}, {saved}, {out}, ... filled from ctx, words the stderr line must hold)
CLI = {
    "trace --max-new-tokens 1.5": (["trace", "{llama}", "--prompt", "x", "--max-new-tokens", "1.5"], "--max-new-tokens"),
    "trace --max-new-tokens -1": (["trace", "{llama}", "--prompt", "x", "--max-new-tokens", "-1"], "max_new_tokens=-1"),
    "trace --heads bogus": (["trace", "{llama}", "--prompt", "x", "--heads", "bogus"], "--heads 'bogus'"),
    "trace --rows 0.5": (["trace", "{llama}", "--prompt", "x", "--rows", "0.5"], "--rows"),
    "trace --layers a": (["trace", "{llama}", "--prompt", "x", "--layers", "a"], "--layers"),
    "trace --dtype int8": (["trace", "{llama}", "--prompt", "x", "--dtype", "int8"], "dtype='int8'"),
    "trace --model-dtype int8": (["trace", "{llama}", "--prompt", "x", "--model-dtype", "int8"], "int8"),
    "trace --flow bogus": (["trace", "{llama}", "--prompt", "x", "--flow", "bogus"], "--flow 'bogus'"),
    "trace --exclude-keys a": (["trace", "{llama}", "--prompt", "x", "--exclude-keys", "a"], "--exclude-keys"),
    "trace --exclude-keys 99": (["trace", "{llama}", "--prompt", "the cat", "--exclude-keys", "99", "--no-progress"], "99"),
    "trace --device tpu": (["trace", "{llama}", "--prompt", "x", "--device", "tpu"], "--device 'tpu'"),
    "trace --top -1": (["trace", "{llama}", "--prompt", "x", "--top", "-1"], "--top -1"),
    "trace no prompt": (["trace", "{llama}"], "no prompt"),
    "trace --prompt-file missing": (["trace", "{llama}", "--prompt-file", "{nowhere}"], "nowhere"),
    "trace --documents not JSON": (["trace", "{llama}", "--prompt", "x", "--documents", "{file}"], "a-file"),
    "trace missing model folder": (["trace", "{nowhere}", "--prompt", "x", "--no-progress"], "nowhere"),
    "trace not a model": (["trace", "{not_model}", "--prompt", "x", "--no-progress"], "notes"),
    "trace truncated weights": (["trace", "{truncated}", "--prompt", "x", "--no-progress"], "model.safetensors"),
    "trace unknown model type": (["trace", "{unknown}", "--prompt", "x", "--no-progress"], "bogusformer"),
    "trace truncated GGUF": (["trace", "{truncated_gguf}", "--prompt", "x", "--no-progress"], "truncated.gguf"),
    "trace hub id offline": (["trace", "nobody-org/no-such-model", "--prompt", "x", "--no-progress"], "not found locally"),
    "trace --out FILE": (["trace", "{llama}", "--prompt", "the cat", "--out", "{file}", "--no-progress"], "a-file"),
    "trace --out read-only": (["trace", "{llama}", "--prompt", "the cat", "--out", "{read_only}", "--no-progress"], "ermission"),
    "trace unknown flag": (["trace", "{llama}", "--prompt", "x", "--bogus"], "--bogus"),
    "eval demo --dtype int8": (["eval", "demo", "--out", "{out}", "--dtype", "int8"], "--model-dtype"),
    "eval demo --model-dtype int8": (["eval", "demo", "--out", "{out}", "--model-dtype", "int8", "--no-progress"], "int8"),
    "eval demo --batch-size 0": (["eval", "demo", "--out", "{out}", "--batch-size", "0"], "--batch-size 0"),
    "eval demo --limit 0": (["eval", "demo", "--out", "{out}", "--limit", "0"], "--limit 0"),
    "eval demo --shard 5/2": (["eval", "demo", "--out", "{out}", "--shard", "5/2"], "5/2"),
    "eval demo --mode sample": (["eval", "demo", "--out", "{out}", "--mode", "sample"], "sample"),
    "eval demo --out FILE": (["eval", "demo", "--out", "{file}", "--limit", "1"], "a-file"),
    "eval hotpotqa no --data": (["eval", "hotpotqa", "--model", "{llama}", "--out", "{out}"], "--data"),
    "eval hotpotqa missing data": (["eval", "hotpotqa", "--model", "{llama}", "--data", "{nowhere}", "--out", "{out}"], "nowhere"),
    "eval merge missing shard": (["eval", "merge", "{nowhere}", "--out", "{out}"], "nowhere"),
    "demo --out FILE": (["demo", "--out", "{file}", "--examples", "1", "--no-progress"], "a-file"),
    "demo --examples 0": (["demo", "--examples", "0"], "--examples 0"),
    "demo --examples x": (["demo", "--examples", "x"], "--examples"),
    "render missing trace": (["render", "{nowhere}", "--out", "{out}"], "nowhere"),
    "render a model folder": (["render", "{llama}", "--out", "{out}"], "manifest"),
    "render --out the trace": (["render", "{saved}", "--out", "{saved}"], "saved"),
    "render --shard-bytes 10": (["render", "{saved}", "--out", "{out}", "--shard-bytes", "10"], "shard_bytes=10"),
    "serve --port 70000": (["serve", "--port", "70000", "--no-browser"], "--port 70000"),
    "serve --host 0.0.0.0": (["serve", "--host", "0.0.0.0", "--no-browser"], "0.0.0.0"),
    "serve --max-tokens 0": (["serve", "--max-tokens", "0", "--no-browser"], "--max-tokens 0"),
    "convert not a GGUF": (["convert", "{file}", "{out}"], "a-file"),
    "convert truncated GGUF": (["convert", "{truncated_gguf}", "{out}"], "truncated.gguf"),
    "unknown command": (["fly"], "fly"),
}


@pytest.mark.parametrize("case", list(CLI))
def test_cli(case, ctx, capsys, monkeypatch):
    argv, words = CLI[case]
    names = {"nowhere": ctx.root / "nowhere", "out": ctx.out(), "read_only": read_only(ctx, monkeypatch)}
    names |= {k: getattr(ctx, k) for k in ("llama", "not_model", "truncated", "unknown", "truncated_gguf", "file", "saved")}
    argv = [a.format(**names) for a in argv]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    no_server(monkeypatch)
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except BaseException as err:
        RAW.append(case)
        raise AssertionError(f"{case}: raw traceback {type(err).__name__}: {err}") from err
    err = capsys.readouterr().err
    assert code == 2, f"{case}: exit {code}, stderr {err!r}"
    assert err.count("\n") == 1 and err.startswith("attnflow: error: "), f"{case}: stderr is not one line: {err!r}"
    assert words.lower() in err.lower(), f"{case}: {err!r} does not name {words!r}"


def test_flow_validation_passes_attention_and_has_an_escape_hatch(ctx):
    """Left-padded fp16 attention passes; validate=False composes what validation refuses, and changes nothing else."""
    tr = make_trace([5, 3], layers=(0, 1, 2, 3), dtype=torch.float16)  # pad rows of example 1 sum to 0
    for method in ("rollout", "flow", "sum", "raw", "maxflow"):
        checked = af.flow.compose(tr.patterns, method, rows=[-1], key_mask=tr.attention_mask)
        plain = af.flow.compose(tr.patterns, method, rows=[-1], key_mask=tr.attention_mask, validate=False)
        assert torch.equal(checked, plain), method
    bad = bad_rows(ctx.A)
    with pytest.raises(DataError, match=r"layer 1 sum to 5 \(at \[\*batch, head, query\] = \(0, \d, 2\)\)"):
        af.flow.rollout(bad)
    R = af.flow.rollout(bad, validate=False)  # composed as given: rollout renormalises each row
    assert torch.isfinite(R).all() and torch.allclose(R.sum(-1), torch.ones(2, 5))
    maxed = make_trace([5, 3], layers=(0, 1, 2, 3), reduced="max")  # max over heads: rows need not sum to 1
    maxed.patterns *= 1.7
    assert af.attribution.validate_trace(maxed) is False
    assert af.attribute(maxed, method="rollout").num_rows > 0
    sinks = make_trace([5, 3], layers=(0, 1, 2, 3))
    sinks.patterns *= 0.6  # a sink logit took 40% of every row
    sinks.model_info["attention_sinks"] = True
    assert af.attribute(sinks, method="rollout").num_rows > 0
    sinks.model_info["attention_sinks"] = False
    with pytest.raises(DataError, match="sum to 0.6"):
        af.attribute(sinks, method="rollout")


def test_hub_id_fails_fast_offline(ctx, monkeypatch):
    """A hub id that is not cached fails in well under the ~50 s of retries, touching no network."""
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("attnflow opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="not found locally"):
        af.load("nobody-org/no-such-model")
    assert time.perf_counter() - start < 2


def test_a_cached_hub_id_loads_without_network(ctx, tmp_path, monkeypatch):
    """A hub id in the local Hugging Face cache loads from its snapshot folder, with no network and no retries."""
    import socket

    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--some-org--tiny"
    shutil.copytree(ctx.llama, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: (_ for _ in ()).throw(AssertionError("network")))
    model = af.load("some-org/tiny")
    tr = af.trace(model, "the cat sat", heads="mean", progress=False)
    assert tr.patterns.shape == (1, 2, 1, 3, 3) and tr.model_info["num_layers"] == 2  # 3 words, no BOS
    # the model keeps its hub id (as from_pretrained(id) would): NDIF's model key names the repo, not the snapshot
    assert model._module.name_or_path == model._module.config._name_or_path == model.repo_id == "some-org/tiny"
    with pytest.raises(ModelNotFoundError, match="'some-org/other' is not found locally"):
        af.load("some-org/other")


def unreadable(monkeypatch, *targets: Path) -> None:
    """Reads of anything under `targets` fail with EACCES, as for a file whose mode forbids it (root ignores modes):
    Python's open and Path.read_text/read_bytes, and pyarrow's Parquet reader."""
    import builtins

    import pyarrow.parquet as pq

    def refused(path) -> bool:
        try:
            p = Path(path).resolve()
        except TypeError:  # a file descriptor
            return False
        return any(p == t or t in p.parents for t in (Path(t).resolve() for t in targets))

    def guard(real, path_of=lambda *a, **k: a[0]):
        def call(*args, **kwargs):
            path = path_of(*args, **kwargs)
            if refused(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real(*args, **kwargs)

        return call

    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda file, mode="r", *a, **k: (
        guard(real_open)(file, mode, *a, **k) if "r" in mode and "+" not in mode else real_open(file, mode, *a, **k)))
    monkeypatch.setattr(Path, "read_text", guard(Path.read_text))
    monkeypatch.setattr(Path, "read_bytes", guard(Path.read_bytes))
    monkeypatch.setattr(pq, "read_table", guard(pq.read_table))


def _documents(root: Path) -> Path:
    f = root / "docs.json"
    f.write_text(json.dumps({"paris": "alice lives in paris ."}))
    return f


def _hotpot(root: Path) -> Path:
    f = root / "hotpot.json"
    f.write_text("[]")
    return f


def _run_file(root: Path, name: str, text: str | None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = root / "run" / name
    f.parent.mkdir(exist_ok=True)
    if text is None:
        pq.write_table(pa.table({"index": [0]}), f)
    else:
        f.write_text(text)
    return f


# id -> (the file made unreadable, given ctx; an API call or a CLI argv with {target}; words of the message)
UNREADABLE = {
    "API load a saved trace": (lambda c: c.saved, lambda c, t: AttentionTrace.load(t), "cannot read"),
    "API load a trace's layer table": (
        lambda c: c.saved / "attention", lambda c, t: AttentionTrace.load(c.saved), "attention"),
    "API read_documents": (lambda c: _documents(c.root), lambda c, t: af.prompting.read_documents(t), "docs.json"),
    "API load_hotpotqa": (lambda c: _hotpot(c.root), lambda c, t: load_hotpotqa(t), "hotpot.json"),
    "API an eval run's config.json": (
        lambda c: _run_file(c.root, "config.json", "{}"), lambda c, t: store.read_config(t), "config.json"),
    "API an eval run's examples table": (
        lambda c: _run_file(c.root, "examples.parquet", None), lambda c, t: store.read_part(t), "examples.parquet"),
    "CLI render a saved trace": (lambda c: c.saved, ["render", "{target}", "--out", "{out}"], "cannot read"),
    "CLI trace --documents": (
        lambda c: _documents(c.root), ["trace", "{llama}", "--prompt", "x", "--documents", "{target}"], "docs.json"),
    "CLI eval hotpotqa --data": (
        lambda c: _hotpot(c.root), ["eval", "hotpotqa", "--model", "{llama}", "--data", "{target}", "--out", "{out}"],
        "hotpot.json"),
}


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_a_file_the_system_will_not_read_is_one_storage_error(case, ctx, capsys, monkeypatch):
    """EACCES while reading is a StorageError (API) or one line with exit 2 (CLI) naming the file and what to do."""
    make, call, words = UNREADABLE[case]
    target = make(ctx)
    unreadable(monkeypatch, target)
    if callable(call):
        with pytest.raises(StorageError) as err:
            call(ctx, target)
        message = str(err.value)
    else:
        argv = [a.format(target=target, out=ctx.out(), llama=ctx.llama) for a in call]
        capsys.readouterr()
        assert cli.main(argv) == 2
        message = capsys.readouterr().err
        assert message.count("\n") == 1 and message.startswith("attnflow: error: cannot read"), message
    assert "\n" not in message.strip() and "Permission denied [EACCES]" in message and words in message, message
    assert "check its permissions" in message, message


def test_a_damaged_eval_table_or_config_is_a_data_error(tmp_path):
    (tmp_path / "examples.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="examples.parquet cannot be read as Parquet"):
        store.read_part(tmp_path / "examples.parquet")
    with pytest.raises(DataError, match="holds a JSON list"):
        store.read_config(tmp_path / "config.json")


def test_no_raw_tracebacks():
    """The count the issue asks for: at least 60 bad inputs, 0 raw tracebacks among those that ran."""
    assert len(API) + len(CLI) >= 60
    print(f"bad inputs: {len(API)} API + {len(CLI)} CLI = {len(API) + len(CLI)}; raw tracebacks: {len(RAW)}")
    assert RAW == []
