"""Write notebooks/quickstart.ipynb from the cells below, without outputs (tests/test_notebook.py executes a copy).

The committed notebook carries no outputs: nothing machine-specific (paths, timings) goes into the repository.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell(
        "# attnflow quick start\n\n"
        "Record attention from the embedded demo model (a 4-layer Llama trained on a synthetic\n"
        "multi-document QA task), compose it into rollout and flow, attribute the answer to the\n"
        "documents, and look at it. Everything runs offline on a CPU."
    ),
    new_code_cell(
        "import torch\n"
        "import attnflow as af\n\n"
        "model = af.demo.load()          # nnsight-wrapped LlamaForCausalLM, loaded from the package\n"
        "example = af.demo.task.generate(1, seed=11)[0]\n"
        "prompt, documents = af.demo.task.render_prompt(example)\n"
        "print(prompt)\n"
        "print('gold answer:', example.answer, '| supporting documents:', [documents[i][0] for i in example.support])"
    ),
    new_markdown_cell(
        "`af.trace` generates the answer greedily, then records every layer's attention in one forward\n"
        "pass over prompt + answer, with the model's sdpa kernel left on. Document spans come from the\n"
        "tokenizer's offset mapping."
    ),
    new_code_cell(
        "spans = af.attribution.text_spans(model.tokenizer, prompt, documents)\n"
        "tr = af.trace(model, [prompt], max_new_tokens=2, spans=[spans], dtype=torch.float32, progress=False)\n"
        "print(tr)\n"
        "print('generated:', tr.tokens[0][tr.prompt_lengths[0]:])"
    ),
    new_markdown_cell("Compose the layers. `rows=[-2]` computes only the row that produced the answer token (top-down)."),
    new_code_cell(
        "R = af.flow.rollout(tr.patterns, alpha=0.5, exclude_keys=(0,))          # [batch, query, key]\n"
        "row = af.flow.rollout(tr.patterns, alpha=0.5, exclude_keys=(0,), rows=[-3])\n"
        "assert torch.allclose(row[:, 0], R[:, -3], atol=1e-6)\n"
        "R.shape, row.shape"
    ),
    new_markdown_cell("Attribute the answer to the documents: each method's share of the answer row, ranked."),
    new_code_cell(
        "tables = [af.attribute(tr, method=m, sources='spans', span_kind='document', targets=[tr.prompt_lengths[0]],\n"
        "                       exclude_keys=(0,)).to_pandas() for m in ('raw', 'rollout', 'flow')]\n"
        "import pandas as pd\n"
        "scores = pd.concat(tables)\n"
        "scores['document'] = [spans[i].name for i in scores.source_span]\n"
        "scores[['method', 'document', 'score', 'rank']]"
    ),
    new_code_cell(
        "best = scores[(scores.method == 'flow') & (scores['rank'] == 1)].document.item()\n"
        "print('flow puts the answer in', best, '| truth:', [documents[i][0] for i in example.support])"
    ),
    new_markdown_cell(
        "The inline viewer. Observer: hover position p to see what p attended to; Observed: who attended to p;\n"
        "Flow: hover a token to see what it was produced from (rollout, alpha 0.5, of the rows that produced the\n"
        "answer, computed by `inline_html` by default; `af.exporters.inline_html(tr, flow=None)` leaves it out).\n"
        "Double-click freezes a token. A saved notebook shows a line of text instead: run the cell again.\n"
        "`af.exporters.to_html(tr, 'out/', gold={0: [...]})` writes the sharded viewer for big traces."
    ),
    new_code_cell("tr"),
]


def main() -> None:
    nb = new_notebook(cells=CELLS, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}})
    path = Path(__file__).with_name("quickstart.ipynb")
    tmp = path.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    tmp.replace(path)
    print(path)


if __name__ == "__main__":
    main()
