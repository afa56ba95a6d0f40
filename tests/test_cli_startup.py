"""`attnflow --help` and `--version` parse and print without importing torch, transformers or nnsight."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import attnflow

SRC = str(Path(attnflow.__file__).resolve().parents[1])
HEAVY = ("torch", "transformers", "nnsight", "transformer_lens")
CODE = f"""
import sys
import attnflow.cli
try:
    code = attnflow.cli.main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print("LOADED", sorted(m for m in {HEAVY!r} if m in sys.modules), code)
"""


def run(*argv: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CODE, *argv], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize(
    "argv", [["--help"], ["--version"], ["trace", "--help"], ["eval", "demo", "--help"], ["render", "--help"], []]
)
def test_help_and_version_leave_torch_unimported(argv):
    out = run(*argv)
    assert out.splitlines()[-1] == f"LOADED [] {2 if not argv else 0}"
    if argv == ["--version"]:
        assert out.splitlines()[0] == attnflow.__version__
    elif argv:
        assert "usage: attnflow" in out


def test_the_public_names_still_resolve():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    code = (
        "import sys, attnflow as af; assert 'torch' not in sys.modules; "
        "import attnflow.attention_trace as T; assert T.AttentionTrace is af.AttentionTrace and T.Span is af.Span; "
        "from attnflow import trace; assert trace is af.trace; "
        "print(callable(af.trace), callable(af.load), af.attribute.__module__, "
        "af.flow.__name__, af.exporters.__name__, af.demo.__name__, af.errors.__name__, "
        "sorted(set(af.__all__) - set(dir(af))))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=True).stdout
    assert out.split() == [
        "True", "True", "attnflow.attribution", "attnflow.flow", "attnflow.exporters", "attnflow.demo", "attnflow.errors", "[]",
    ]  # fmt: skip
