"""`attnflow convert MODEL.gguf OUT_DIR`: save a GGUF checkpoint, dequantised, as an ordinary safetensors folder.

    $ attnflow convert SmolLM2-135M-Instruct.Q4_1.gguf smollm2/
    converted SmolLM2-135M-Instruct.Q4_1.gguf (llama, 30 layers, float32) -> smollm2/

transformers refuses `save_pretrained` on a GGUF-loaded model; `af.save_model` copies
the weights into a plain model of the same config and writes it with its tokenizer
(chat template included) and a `manifest.json` marking the folder as attnflow's.
OUT_DIR must be new or empty; `--overwrite` replaces only a folder an earlier
`attnflow convert` wrote.
"""

from __future__ import annotations


def add_parser(subparsers) -> None:
    c = subparsers.add_parser("convert", help="save a .gguf checkpoint as a plain safetensors model folder")
    c.add_argument("model", help="the .gguf file (or a folder holding exactly one)")
    c.add_argument("out_dir", help="new or empty folder to write the model to")
    c.add_argument("--model-dtype", default="float32", help="dtype of the saved weights: float32 | bfloat16 | float16")
    c.add_argument("--gguf-file", default=None, help="the .gguf file's name when MODEL is a folder holding several")
    c.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if an earlier attnflow convert wrote it")
    c.set_defaults(func=run)


def run(args) -> int:
    from attnflow.gguf import gguf_path, load_gguf, save_model
    from attnflow.outdirs import check_out_dir

    file = gguf_path(args.model, args.gguf_file)
    check_out_dir(args.out_dir, "model", overwrite=args.overwrite, inputs=[file], flag="OUT_DIR")  # before the slow load
    hf, tok = load_gguf(file, dtype=args.model_dtype)
    out = save_model(hf, tok, args.out_dir, overwrite=args.overwrite, source=file)
    dtype = str(hf.dtype).removeprefix("torch.")
    print(f"converted {file.name} ({hf.config.model_type}, {hf.config.num_hidden_layers} layers, {dtype}) -> {out}")
    return 0
