"""Export benchmark: attnflow's sharded HTML and Parquet next to bertviz's head_view HTML.

    python bench/export.py                 # L=24, H=16, N=1024; Chromium timing at N=2048
    python bench/export.py --n 256 --no-browser

Prints bytes per attention value, write time and largest file for
  - attnflow.exporters.to_html (uint8 and float16 shards),
  - attnflow.exporters.to_parquet (float16),
  - bertviz.head_view(..., html_action="return") on the same tensors,
as ratios to bertviz.  bertviz writes every value as JSON text into one page; at
L=24, H=16, N=1024 that is ~400M numbers (~8 GB of text), more than this bench
should hold in memory, so it is measured on the first --bertviz-layers layers of
the same tensors and scaled linearly in the number of layers (its cost per value
does not depend on the count).  "per value" divides by L*H*N*N, the dense tensor
bertviz stores; "per stored" divides by the causal values attnflow keeps,
L*H*N*(N+1)/2.  Goals: <= 1.5 bytes per stored value, every shard <= shard_bytes.

Then it opens a viewer of an N=2048 trace in headless Chromium and times page
open + first hover (the goal is under 1 s; measured, not asserted) and the head grid.  bertviz is
pip-installed into this environment when missing.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from attnflow.exporters import to_html, to_parquet
from attnflow.attention_trace import AttentionTrace


def random_trace(L: int, H: int, N: int, seed: int = 0) -> AttentionTrace:
    """One example of N tokens with peaked causal softmax rows, float16, built one layer at a time."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.zeros(1, L, H, N, N, dtype=torch.float16)
    future = torch.ones(N, N, dtype=torch.bool).triu(1)
    for layer in range(L):
        logits = torch.randn(H, N, N, generator=g) * 2.5
        patterns[0, layer] = logits.masked_fill(future, float("-inf")).softmax(-1).half()
    words = ["the", "cat", "sat", "on", "a", "mat", ".", "\n", "and", "then", "it", "slept"]
    return AttentionTrace(
        patterns=patterns,
        input_ids=torch.arange(N).view(1, N) % 50000,
        attention_mask=torch.ones(1, N, dtype=torch.long),
        query_positions=torch.arange(N).view(1, N),
        tokens=[[("Ġ" if i % 3 else "") + words[i % len(words)] for i in range(N)]],
        prompt_lengths=[N - 16],
        layers=list(range(L)),
        heads="all",
        model_info={"name": f"random L={L} H={H}", "num_layers": L, "num_heads": H},
        settings={"dtype": "float16", "rows": "all"},
    )


def files_of(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]


def measure(fn, out: Path) -> tuple[float, int, int]:
    t = time.perf_counter()
    fn()
    secs = time.perf_counter() - t
    sizes = [p.stat().st_size for p in files_of(out)]
    return secs, sum(sizes), max(sizes)


def bertviz_head_view():
    try:
        return importlib.import_module("bertviz").head_view
    except ImportError:
        print("installing bertviz into this environment ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "bertviz"], check=True)
        return importlib.import_module("bertviz").head_view


def run_bertviz(tr: AttentionTrace, layers: int, out: Path) -> tuple[float, int]:
    head_view = bertviz_head_view()
    attention = tuple(tr.patterns[:, i].float() for i in range(layers))  # bertviz: per layer [batch, head, N, N]
    t = time.perf_counter()
    html = head_view(attention, tr.tokens[0], html_action="return")
    text = html.data if hasattr(html, "data") else str(html)
    out.write_text(text)
    return time.perf_counter() - t, out.stat().st_size


def browser_timing(N: int, L: int, H: int, shard_bytes: int, work: Path) -> dict:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    tr = random_trace(L, H, N, seed=1)
    out = to_html(tr, work / f"view{N}", shard_bytes=shard_bytes)
    tr = None  # free it before opening the browser
    opts = Options()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,1000", f"--user-data-dir={tempfile.mkdtemp(dir=work)}"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        d.get("about:blank")
        results = []
        for _ in range(3):
            t = time.perf_counter()
            d.get((out / "index.html").as_uri())
            WebDriverWait(d, 30, poll_frequency=0.005).until(lambda d: d.execute_script("return document.getElementById('app').dataset.state") == "ready")
            ready = time.perf_counter() - t
            tok = d.find_element(By.CSS_SELECTOR, f'#tokens .tok[data-pos="{N - 1}"]')  # the pane opens in Observer
            d.execute_script("arguments[0].scrollIntoView({block: 'center'})", tok)
            ActionChains(d).move_to_element(tok).perform()
            WebDriverWait(d, 30, poll_frequency=0.005).until(lambda d: tok.get_attribute("data-w") is not None)
            total = time.perf_counter() - t
            WebDriverWait(d, 30).until(lambda d: d.execute_script("return document.getElementById('headgrid').dataset.drawn") == "true")
            marks = d.execute_script(
                "const r = performance.getEntriesByName('attnflow:ready')[0];"
                "const h = performance.getEntriesByName('attnflow:hover')[0];"
                "const g = performance.getEntriesByName('attnflow:thumbs')[0];"
                "return [r.startTime / 1000, h.duration / 1000, g.startTime / 1000];"
            )
            results.append((ready, total, *marks))
        best = min(results, key=lambda r: r[1])
        return {"ready": best[0], "total": best[1], "in_page_ready": best[2], "in_page_hover": best[3],
                "in_page_thumbs": best[4], "runs": results}
    finally:
        d.quit()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--shard-bytes", type=int, default=8 * 2**20)
    p.add_argument("--bertviz-layers", type=int, default=1, help="layers given to bertviz (scaled to --layers)")
    p.add_argument("--no-bertviz", action="store_true")
    p.add_argument("--browser-n", type=int, default=2048)
    p.add_argument("--browser-layers", type=int, default=4, help="layers of the N=2048 trace (open + first hover reads layer 0 only)")
    p.add_argument("--no-browser", action="store_true")
    p.add_argument("--keep", default=None, help="keep the outputs in this directory")
    args = p.parse_args(argv)
    L, H, N = args.layers, args.heads, args.n
    work = Path(args.keep or tempfile.mkdtemp(prefix="attnflow-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    dense = L * H * N * N
    stored = L * H * N * (N + 1) // 2
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; trace L={L} H={H} N={N}: "
          f"{dense:,} values dense, {stored:,} stored (causal)")
    tr = random_trace(L, H, N)

    rows = []
    for name, fn, out in (
        ("attnflow to_html uint8", lambda: to_html(tr, work / "html8", shard_bytes=args.shard_bytes), work / "html8"),
        ("attnflow to_html float16", lambda: to_html(tr, work / "html16", shard_bytes=args.shard_bytes, precision="float16"), work / "html16"),
        ("attnflow to_parquet float16", lambda: to_parquet(tr, work / "parquet"), work / "parquet"),
    ):
        secs, size, largest = measure(fn, out)
        n_files = len(files_of(out))
        shards = [q.stat().st_size for q in (out / "shards").iterdir()] if (out / "shards").is_dir() else []
        rows.append((name, secs, size, largest, n_files, max(shards, default=0)))
        if out.name == "html16":
            shutil.rmtree(out)  # keep the disk footprint down

    bv = None
    if not args.no_bertviz:
        k = min(args.bertviz_layers, L)
        secs, size = run_bertviz(tr, k, work / "bertviz.html")
        bv = (secs * L / k, size * L / k, k)
        (work / "bertviz.html").unlink()

    print()
    hdr = f"{'exporter':30} {'write s':>8} {'MiB':>9} {'B/value':>8} {'B/stored':>9} {'files':>6} {'largest MiB':>12} {'size vs bertviz':>16} {'time vs bertviz':>16}"
    print(hdr)
    print("-" * len(hdr))
    for name, secs, size, largest, n_files, _ in rows:
        ratio = f"{size / bv[1]:.4f}x" if bv else "-"
        tratio = f"{secs / bv[0]:.4f}x" if bv else "-"
        print(f"{name:30} {secs:8.1f} {size / 2**20:9.1f} {size / dense:8.3f} {size / stored:9.3f} {n_files:6d} "
              f"{largest / 2**20:12.2f} {ratio:>16} {tratio:>16}")
    if bv:
        secs, size, k = bv
        print(f"{'bertviz head_view':30} {secs:8.1f} {size / 2**20:9.1f} {size / dense:8.3f} {size / stored:9.3f} "
              f"{1:6d} {size / 2**20:12.2f} {'1x':>16} {'1x':>16}")
        print(f"  (bertviz measured on {k} of {L} layers and scaled by {L / k:g}; one page that loads require.js, d3 and jQuery from a CDN)")
    for name, *_, shard_max in rows:
        if shard_max:
            ok = "ok" if shard_max <= args.shard_bytes else "OVER"
            print(f"  {name}: largest shard {shard_max:,} bytes <= shard_bytes {args.shard_bytes:,}: {ok}")
    tr = None  # free the patterns before the browser timing

    if not args.no_browser:
        if not Path("/usr/bin/chromium").exists():
            print("\nno /usr/bin/chromium: skipping the browser timing (apt-get install -y chromium chromium-driver)")
        else:
            t = browser_timing(args.browser_n, args.browser_layers, H, args.shard_bytes, work)
            print(f"\nChromium, N={args.browser_n} (L={args.browser_layers}, H={H}), best of 3; goal < 1 s:")
            print(f"  page clock: navigation -> viewer ready {t['in_page_ready']:.2f} s, first hover painted in "
                  f"{t['in_page_hover'] * 1000:.0f} ms (row of {args.browser_n} keys): {t['in_page_ready'] + t['in_page_hover']:.2f} s")
            print(f"  through WebDriver: open -> ready {t['ready']:.2f} s, + move the mouse and see the row {t['total']:.2f} s")
            print(f"  layer x head thumbnail grid drawn {t['in_page_thumbs']:.2f} s after navigation (page clock; goal < 2 s)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
