"""Every listed bad input gives a one-line attnflow error, and `attnflow trace` exits 2 with that line."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

import attnflow as af
from attnflow import cli
from attnflow.errors import BadArgumentError, ModelNotFoundError, NonFiniteError, PromptError, UnsupportedModelError


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, llama):
    path = tmp_path_factory.mktemp("tiny-llama")
    llama.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


class LegacyAttention(torch.nn.Module):
    """Attention written by hand, without transformers' attention interface."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v


class LegacyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.attn = LegacyAttention()

    def forward(self, input_ids, **kwargs):
        return self.attn(self.embed(input_ids))


def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


def test_model_without_attention_interface():
    with pytest.raises(UnsupportedModelError) as err:
        af.trace(LegacyModel(), [[1, 2, 3]], progress=False)
    assert "LegacyAttention" in one_line(err) and "attention_interface" in one_line(err) and "Llama" in one_line(err)


def test_model_without_attention_modules():
    from transformers import AutoConfig, AutoModelForCausalLM

    mamba = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("mamba", vocab_size=100, hidden_size=16, num_hidden_layers=1, state_size=4)
    )
    with pytest.raises(UnsupportedModelError, match="MambaForCausalLM"):
        af.trace(mamba, [[1, 2, 3]], progress=False)


def test_not_a_model():
    with pytest.raises(UnsupportedModelError, match="cannot trace a str"):
        af.trace("gpt2", ["hi"], progress=False)


@pytest.mark.parametrize("prompt", ["", [], [[5, 6], []]])
def test_empty_prompt(llama, prompt):
    with pytest.raises(PromptError) as err:
        af.trace(llama, prompt, tokenizer=tiny_tokenizer(), progress=False)
    assert "empty" in one_line(err)


def test_prompt_longer_than_max_positions(llama):
    with pytest.raises(PromptError) as err:
        af.trace(llama, [[5] * 65], progress=False)
    assert "65 tokens" in one_line(err) and "64 positions" in one_line(err)
    with pytest.raises(PromptError, match=r"60 tokens \+ 5 to generate"):
        af.trace(llama, [[5] * 60], max_new_tokens=5, progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"heads": "median"}, "heads='median'"),
        ({"heads": torch.ones(2, 3)}, r"shape \(2, 3\); this model needs \[layer, head\] = \(2, 4\)"),
        ({"rows": "first"}, "rows='first'"),
        ({"rows": [0, 20]}, "out of range for example 0"),
        ({"rows": "completion"}, "needs a completion"),
        ({"layers": [2]}, r"layer 2 is out of range for a model with 2 layers; use indices in -2\.\.1"),
        ({"layers": [-3]}, "out of range"),
        ({"dtype": "int8"}, "dtype='int8'"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"max_new_tokens": 2, "completions": [[5]]}, "not both"),
        ({"max_new_tokens": -1}, "max_new_tokens=-1"),
    ],
)
def test_bad_arguments(llama, kwargs, match):
    with pytest.raises(BadArgumentError) as err:
        af.trace(llama, [[5, 6, 7]], progress=False, **kwargs)
    assert one_line(err)
    err.match(match)


def test_non_finite_attention_names_the_layer():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError) as err:
        af.trace(model, [[5, 6, 7]], progress=False)
    assert "layer 1 (example 0)" in one_line(err)


def test_missing_model_directory(tmp_path):
    for name in (str(tmp_path / "nope"), "nope", "./org/name", "a/b/c"):
        with pytest.raises(ModelNotFoundError) as err:
            af.load(name)
        assert "no model directory" in one_line(err)


def test_load_bad_dtype(model_dir):
    with pytest.raises(BadArgumentError, match="dtype='float99'"):
        af.load(model_dir, dtype="float99")


def test_load_local_directory(model_dir):
    model = af.load(model_dir)
    tr = af.trace(model, "alice lives in paris", heads="mean", progress=False)
    assert tr.tokens == [["alice", "lives", "in", "paris"]] and tr.patterns.shape == (1, 2, 1, 4, 4)
    assert type(model).__name__ == "TransformersModel"


def run_cli(args, capsys):
    code = cli.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_trace_writes_a_trace(model_dir, tmp_path, capsys):
    out = tmp_path / "tr"
    code, stdout, _ = run_cli(
        ["trace", str(model_dir), "--prompt", "the cat sat", "--prompt", "alice lives in paris", "--heads", "mean",
         "--rows", "last", "--layers", "0,-1", "--max-new-tokens", "2", "--out", str(out), "--no-progress"],
        capsys,
    )
    assert code == 0 and str(out) in stdout and stdout.count("\n") == 1
    tr = af.AttentionTrace.load(out)
    assert tr.heads == "mean" and tr.layers == [0, 1] and tr.patterns.shape[2:4] == (1, 1)
    assert tr.prompt_lengths == [3, 4] and tr.settings["max_new_tokens"] == 2


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--heads", "median"], "--heads 'median'"),
        (["--rows", "first"], "--rows 'first' is not valid"),
        (["--layers", "7"], "layer 7 is out of range"),
        (["--prompt", ""], "empty"),
        (["--prompt", "w1 " * 70], "positions"),
    ],
)
def test_cli_bad_input_exits_2(model_dir, tmp_path, capsys, extra, match):
    code, _, err = run_cli(["trace", str(model_dir), "--prompt", "the cat", "--out", str(tmp_path / "x"), "--no-progress", *extra], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("attnflow: error: ")
    assert match in err
    assert not (tmp_path / "x").exists()


def test_cli_missing_model_exits_2(tmp_path, capsys):
    code, _, err = run_cli(["trace", str(tmp_path / "missing"), "--prompt", "x", "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert code == 2 and err.count("\n") == 1 and "no model directory" in err
