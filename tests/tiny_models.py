"""Tiny random causal LMs of several families and a tiny word-level tokenizer, built offline.

    >>> model = tiny_model("llama")            # 2 layers, hidden 64, vocab 100, q/k scaled until attention is peaked
    >>> tok = tiny_tokenizer()                 # whitespace word-level, <pad>=0 <bos>=1 <eos>=2 <unk>=3
"""

from __future__ import annotations

import copy

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = 100
WORDS = (
    "the a cat dog sat on mat ran to park alice bob lives in paris london where does live ? . : "
    "doc q answer is and of"
).split()

# family -> config overrides on top of COMMON; small windows/caps so they change the patterns
FAMILIES = {
    "llama": dict(model_type="llama", num_key_value_heads=2),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=64),
    "mistral": dict(model_type="mistral", num_key_value_heads=2, sliding_window=4),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2),
    "qwen3": dict(model_type="qwen3", num_key_value_heads=2, head_dim=16),
    "gemma2": dict(
        model_type="gemma2", num_key_value_heads=2, head_dim=16, sliding_window=4, attn_logit_softcapping=3.0,
        query_pre_attn_scalar=16,
    ),
    "phi3": dict(model_type="phi3", num_key_value_heads=2),
    "gpt_neox": dict(model_type="gpt_neox", rotary_pct=0.5),
}
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# q/k projection weights are multiplied by this, so that random attention is peaked (mean row max >= 0.5)
QK_SCALE = {"qwen3": 3.0}


def tiny_config(family: str, **overrides):
    spec = dict(FAMILIES[family])
    model_type = spec.pop("model_type")
    kw = {**COMMON, **spec, **overrides}
    if model_type == "gpt2":
        kw = {k: v for k, v in kw.items() if k not in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                        "intermediate_size", "max_position_embeddings")}
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(family: str, seed: int = 0, attn_implementation: str | None = None, **overrides):
    """A 2-layer random model of `family` in eval mode, float32, with q/k scaled for peaked attention."""
    torch.manual_seed(seed)
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), **kw).eval()
    scale_qk(model, QK_SCALE.get(family, 10.0))
    return model


def scale_qk(model: torch.nn.Module, factor: float) -> None:
    """Multiply the query and key projections (or the fused qkv projection) by `factor`."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("q_proj.", "k_proj.", "qkv_proj.", "c_attn.", "query_key_value.", "q_norm.", "k_norm.")):
                p.mul_(factor)


def eager_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights under eager attention: the reference for `output_attentions=True`."""
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation="eager").eval()
    ref.load_state_dict(model.state_dict())
    return ref


def eager_patterns(ref: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """[layer, head, query, key] float32 attention of one unpadded prompt, from output_attentions=True."""
    with torch.no_grad():
        out = ref(torch.tensor([ids]), output_attentions=True)
    return torch.stack([a[0] for a in out.attentions]).float()


def eager_run(ref: torch.nn.Module, ids: list[int]):
    """(outputs with attentions and hidden states, {layer: attention-module output [query, hidden]}) of one prompt."""
    outs = {}
    hooks = [
        layer.self_attn.register_forward_hook(lambda m, a, o, l=l: outs.__setitem__(l, o[0][0]))
        for l, layer in enumerate(ref.model.layers)
    ]
    try:
        with torch.no_grad():
            res = ref(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return res, outs


def write_gguf(path, arch: str = "mamba3x"):
    """A one-tensor GGUF file of architecture `arch` (transformers refuses unknown ones): `path`."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_tokenizer(chat_template: bool = False) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over VOCAB ids; adds no special tokens to text."""
    words = ["<pad>", "<bos>", "<eos>", "<unk>"] + WORDS
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    if chat_template:
        tok.chat_template = (
            "<bos>{% for m in messages %} {{ m['role'] }} : {{ m['content'] }} .{% endfor %}"
            "{% if add_generation_prompt %} answer :{% endif %}"
        )
    return tok


def prompts_ids(lengths=(7, 12, 16), seed: int = 1) -> list[list[int]]:
    """Random token-id prompts of the given lengths (ids 4..VOCAB-1: no special tokens)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in lengths]
