"""The built wheel, installed (not editable) into a fresh venv, runs `attnflow demo` offline.

The fresh venv gets attnflow from the wheel alone; its dependencies are borrowed
from the test environment through a path file (they are already installed there,
and reinstalling torch and transformers would cost minutes), and the test checks
that attnflow itself is imported from the fresh venv, with its model, tokenizer
and viewer assets coming from the wheel.
"""

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _site(env: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))


def test_wheel_installs_and_runs_demo(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = dist.glob("attnflow-*.whl")

    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    py = env / "bin" / "python"
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (_site(env) / "borrowed-deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-compile", str(wheel)],
        check=True, capture_output=True, text=True,
    )

    run_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    where = subprocess.run(
        [str(py), "-c", "import attnflow, attnflow.exporters as e; print(attnflow.__file__); print(e.__file__)"],
        check=True, capture_output=True, text=True, env=run_env, cwd=tmp_path,
    ).stdout.split()
    assert all(p.startswith(str(env)) for p in where), where

    out = tmp_path / "demo"
    res = subprocess.run(
        [str(env / "bin" / "attnflow"), "demo", "--examples", "8", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, env=run_env, cwd=tmp_path, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "answer accuracy" in res.stdout
    index = out / "html" / "index.html"
    assert res.stdout.strip().splitlines()[-1] == str(index)
    assert index.is_file() and (out / "parquet" / "manifest.json").is_file()
