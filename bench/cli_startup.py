"""Start-up time of the `attnflow` command next to `import torch`, in the same run.

    python bench/cli_startup.py             # 7 runs of each command
    python bench/cli_startup.py --runs 15

Each row is a fresh `python` subprocess, timed from spawn to exit (best and
median of --runs):

    python -c pass                  the interpreter alone (the floor)
    python -c "import torch"        what a command pays once it needs torch
    python -c "import attnflow"     the package, whose public names import on first use
    attnflow --help / --version     the console script: `from attnflow.cli import main; sys.exit(main())`

The console script is run as `python -c` with the script's two lines, against
this checkout's `src/` (PYTHONPATH), so an installed copy elsewhere is not what
is timed.  `x torch` is the row's median over `import torch`'s median (lower is
better); `torch loaded` says whether the command left torch in sys.modules.
Goal: `attnflow --help` under 1.5 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
SCRIPT = "import sys; from attnflow.cli import main; sys.exit(main())"  # what pip's console-script wrapper runs
ROWS = (
    ("python -c pass", "pass", []),
    ('python -c "import torch"', "import torch", []),
    ('python -c "import attnflow"', "import attnflow", []),
    ("attnflow --help", SCRIPT, ["--help"]),
    ("attnflow --version", SCRIPT, ["--version"]),
)
GOAL_S = 1.5
# runs the row's code, then reports on stderr (at exit, after any SystemExit) whether torch was imported
PROBE = "import atexit, sys; atexit.register(lambda: sys.stderr.write('TORCH=%d\\n' % ('torch' in sys.modules))); exec({code!r})"


def env() -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1")
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), e.get("PYTHONPATH", "")) if p)
    return e


def time_once(code: str, argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *argv], env=env(), check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def loads_torch(code: str, argv: list[str]) -> bool:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(code=code), *argv], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    return "TORCH=1" in proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7, help="subprocesses per row (default 7)")
    args = ap.parse_args()
    for _, code, argv in ROWS:  # warm the file cache, so the first row is not charged for it
        time_once(code, argv)
    # interleave the rows, so a burst of load on a shared machine spreads over all of them
    times: dict[str, list[float]] = {name: [] for name, _, _ in ROWS}
    for _ in range(args.runs):
        for name, code, argv in ROWS:
            times[name].append(time_once(code, argv))
    torch_median = statistics.median(times['python -c "import torch"'])
    print(f"{os.cpu_count()} CPUs, {args.runs} runs per row, python {sys.version.split()[0]}\n")
    print("| command | best s | median s | x torch | torch loaded |")
    print("|---|---:|---:|---:|:---:|")
    for name, code, argv in ROWS:
        t = times[name]
        med = statistics.median(t)
        loaded = "yes" if loads_torch(code, argv) else "no"
        print(f"| `{name}` | {min(t):.3f} | {med:.3f} | {med / torch_median:.2f} | {loaded} |")
    help_median = statistics.median(times["attnflow --help"])
    verdict = "meets" if help_median < GOAL_S else "MISSES"
    print(f"\n`attnflow --help` median {help_median:.3f} s: {verdict} the {GOAL_S} s goal")


if __name__ == "__main__":
    main()
