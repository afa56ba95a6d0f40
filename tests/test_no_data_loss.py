"""Output folders never destroy (issue 17): every data-loss case of the issue leaves the user's files byte for byte.

Also: interrupted writes leave no temporary folder past the next run, and concurrent writers of one
view never fail while a reader always finds a complete view.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_parquet import assert_same, make_trace

from attnflow import _io
from attnflow import cli
from attnflow.attention_trace import AttentionTrace
from attnflow.errors import DataError
from attnflow.exporters import to_html, to_parquet

THESIS = b"\\documentclass{article} % three years of work\n"
TESTS = Path(__file__).parent
SRC = Path(_io.__file__).parents[1]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every entry under `folder` (hidden ones too) with its bytes; folders map to b"/"."""
    return {p.relative_to(folder).as_posix(): (b"/" if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def user_dir(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    (d / "thesis.tex").write_bytes(THESIS)
    return d


@pytest.fixture
def user_file(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(THESIS)
    return f


def run_cli(argv, capsys) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


# --- a folder of the user's files ------------------------------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("writer", ["save", "to_parquet", "to_html"])
def test_writers_refuse_a_user_folder(tmp_path, user_dir, writer, overwrite):
    before = snapshot(tmp_path)
    write = {"save": lambda tr, p, **k: tr.save(p, **k), "to_parquet": to_parquet, "to_html": to_html}[writer]
    with pytest.raises(DataError, match="holds files attnflow did not write"):
        write(make_trace([4, 3]), user_dir, overwrite=overwrite)
    assert snapshot(tmp_path) == before and (user_dir / "thesis.tex").read_bytes() == THESIS


def test_trace_command_refuses_a_user_folder(tmp_path, user_dir, capsys):
    """The issue's first case: `attnflow trace M --prompt "the cat" --out r` deleted r/thesis.tex."""
    from tiny_models import tiny_model, tiny_tokenizer

    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    before = snapshot(user_dir)
    capsys.readouterr()  # save_pretrained's progress bar
    code, err = run_cli(["trace", model_dir, "--prompt", "the cat", "--out", user_dir, "--no-progress"], capsys)
    assert code == 2 and "did not write" in err and err.count("\n") == 1
    assert snapshot(user_dir) == before


def test_a_folder_of_another_kind_is_refused(tmp_path):
    tr = make_trace([4, 3])
    run = tr.save(tmp_path / "run")
    before = snapshot(run)
    with pytest.raises(DataError, match="holds an attnflow trace output, not a html"):
        to_html(tr, run, overwrite=True)
    with pytest.raises(DataError, match="holds an attnflow trace output, not a parquet"):
        to_parquet(tr, run, overwrite=True)
    assert snapshot(run) == before


def test_same_kind_only_with_overwrite(tmp_path):
    a, b = make_trace([4, 3]), make_trace([5], layers=(2,))
    run = a.save(tmp_path / "run")
    with pytest.raises(DataError, match=r"already holds an attnflow trace; pass overwrite=True \(CLI: --overwrite\)"):
        b.save(run)
    assert_same(a, AttentionTrace.load(run))
    b.save(run, overwrite=True)
    assert_same(b, AttentionTrace.load(run))
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_an_empty_folder_is_new(tmp_path):
    (tmp_path / "empty").mkdir()
    tr = make_trace([4])
    assert_same(tr, AttentionTrace.load(tr.save(tmp_path / "empty")))


# --- render T --out T -------------------------------------------------------------------------------
def test_render_into_its_own_trace_is_refused(tmp_path, capsys):
    run = to_parquet(make_trace([4, 3]), tmp_path / "run")
    before = snapshot(tmp_path)
    for out in (run, tmp_path):  # the input itself, a folder holding it
        code, err = run_cli(["render", run, "--out", out, "--overwrite"], capsys)
        assert code == 2 and "input" in err and err.count("\n") == 1
    assert snapshot(tmp_path) == before
    AttentionTrace.load(run)


def test_render_replaces_its_view_only_with_overwrite(tmp_path, capsys):
    run = to_parquet(make_trace([4, 3]), tmp_path / "run")
    assert run_cli(["render", run, "--out", tmp_path / "view"], capsys)[0] == 0
    before = snapshot(tmp_path / "view")
    code, err = run_cli(["render", run, "--out", tmp_path / "view"], capsys)
    assert code == 2 and "--overwrite" in err
    assert snapshot(tmp_path / "view") == before
    assert run_cli(["render", run, "--out", tmp_path / "view", "--overwrite"], capsys)[0] == 0
    assert snapshot(tmp_path / "view") == before  # the same trace gives the same view


# --- a file as --out ------------------------------------------------------------------------------------
def test_a_file_is_never_replaced_or_moved_aside(tmp_path, user_file, capsys):
    tr = make_trace([4, 3])
    run = to_parquet(tr, tmp_path / "run")
    before = snapshot(tmp_path)
    for write in (lambda: tr.save(user_file, overwrite=True), lambda: to_parquet(tr, user_file, overwrite=True),
                  lambda: to_html(tr, user_file, overwrite=True)):  # fmt: skip
        with pytest.raises(DataError, match="is a file; attnflow writes a folder there and never replaces a file"):
            write()
    code, err = run_cli(["render", run, "--out", user_file, "--overwrite"], capsys)
    assert code == 2 and "is a file" in err
    code, err = run_cli(["render", run, "--out", user_file / "view"], capsys)  # a file as a parent
    assert code == 2 and "is a file" in err
    assert snapshot(tmp_path) == before  # no hidden .f.old beside it
    assert user_file.read_bytes() == THESIS


def test_demo_out_file_or_user_folder(tmp_path, user_file, user_dir, capsys, monkeypatch):
    """`demo --out FILE` was a raw traceback after the model ran; now a one-line refusal before it runs."""
    import attnflow.demo

    def no_model(*a, **k):
        raise AssertionError("the demo model was loaded before --out was checked")

    monkeypatch.setattr(attnflow.demo, "load", no_model)
    before = snapshot(tmp_path)
    for out in (user_file, user_dir):
        code, err = run_cli(["demo", "--out", out, "--examples", "1", "--no-progress"], capsys)
        assert code == 2 and err.count("\n") == 1 and ("is a file" in err or "did not write" in err)
    assert snapshot(tmp_path) == before


# --- eval merge s0 s1 --out s0 -----------------------------------------------------------------------------
def fake_shard(path: Path, i: int) -> Path:
    from attnflow.eval.store import ATTRIBUTION_SCHEMA, EXAMPLE_SCHEMA

    path.mkdir()
    (path / "config.json").write_text(json.dumps({"shard": f"{i}/2", "model": "m", "data": "d.jsonl"}))
    pq.write_table(EXAMPLE_SCHEMA.empty_table(), path / "examples.parquet")
    pq.write_table(ATTRIBUTION_SCHEMA.empty_table(), path / "attribution.parquet")
    return path


def test_eval_merge_refuses_an_input_as_output(tmp_path, capsys):
    s0, s1 = fake_shard(tmp_path / "s0", 0), fake_shard(tmp_path / "s1", 1)
    before = snapshot(tmp_path)
    for out in (s0, s1, tmp_path):
        code, err = run_cli(["eval", "merge", s0, s1, "--out", out], capsys)
        assert code == 2 and "input" in err and err.count("\n") == 1
    assert snapshot(tmp_path) == before


# --- interrupted writes ----------------------------------------------------------------------------------------
def run_python(code: str, *args, check=True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{TESTS}"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env, check=check,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_a_killed_writer_leaves_nothing_past_the_next_run(tmp_path):
    killed = """
        import os, sys
        from attnflow import _io
        with _io.output_dir(sys.argv[1], "html") as tmp:
            (tmp / "index.html").write_bytes(b"x" * 2**20)
            os._exit(9)  # killed mid-write
    """
    assert run_python(killed, tmp_path / "view", check=False).returncode == 9
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".view.attnflow-tmp.")
    live = tmp_path / f".other.attnflow-tmp.{os.getppid()}.abc123"  # a live process's temporary: kept
    live.mkdir()
    (tmp_path / "keep.attnflow-tmp.txt").write_bytes(THESIS)  # not hidden, not ours: kept
    to_html(make_trace([4, 3]), tmp_path / "view")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "keep.attnflow-tmp.txt", "view"])


# --- concurrent writers and a reader ------------------------------------------------------------------------------
WRITER = """
    import sys
    from test_parquet import make_trace
    from attnflow.exporters import to_html
    tr = make_trace([6, 5], layers=(0, 1, 2), heads=2)
    for _ in range(int(sys.argv[2])):
        to_html(tr, sys.argv[1], shard_bytes=4096, overwrite=True)
"""


def complete_view(out: Path) -> bool:
    """index.html whole, and every shard it lists present and whole."""
    from test_html import page_data

    text = (out / "index.html").read_text()
    if not text.endswith("</html>\n") or not (out / "viewer.js").is_file():
        return False
    return all((out / "shards" / f"{s['id']}.js").read_text().endswith(");\n") for s in page_data(out)["shards"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the one-step folder exchange is Linux's renameat2")
def test_concurrent_to_html_never_fails_and_readers_see_a_whole_view(tmp_path):
    out = tmp_path / "view"
    to_html(make_trace([6, 5], layers=(0, 1, 2), heads=2), out, shard_bytes=4096)
    assert _io.exchange(tmp_path / "view", tmp_path / "view")  # the file system supports the exchange
    writes = 50
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{TESTS}"}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER), str(out), str(writes)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    reads = bad = 0
    while any(p.poll() is None for p in procs):
        try:
            ok = complete_view(out)
        except OSError:  # a file gone: the view changed under this reader
            ok = False
        reads, bad = reads + 1, bad + (not ok)
        time.sleep(0.002)  # leave the writers the CPU
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    print(f"{reads} reads, {bad} incomplete")
    assert reads > 20 and bad == 0, (reads, bad)
    assert complete_view(out)
    assert [p.name for p in tmp_path.iterdir()] == ["view"]  # no temporaries, no lock files
