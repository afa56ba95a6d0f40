"""Benchmark attnflow.flow.rollout against the per-example loop existing tools use.

    python bench/flow.py            # CPU table, then the same on CUDA when a GPU is present
    python bench/flow.py --quick    # N = 256, 1024 and H=16 at N=512, one repeat for the slow columns
    python bench/flow.py --device cpu

Float32 patterns, B=8, L=24, heads already averaged (H=1), N = 256, 1024, 2048,
plus one row with H=16 at N=512 so the head reduction is timed too.  Columns
(median wall time; CUDA timed with CUDA events):

    naive   per example, per layer: mean heads, 0.5·A + 0.5·I, rows renormalised
            (keepdim), R = Â @ R on full N×N matrices; then the last 32 rows
    full    attnflow rollout, every row (batched, one layer loop)
    rows    attnflow rollout, the last 32 rows only (top-down, O(L·|T|·N²))
    floor   a lower bound of what the code runs: the FLOPs of its matmuls over the matmul rate
            measured in this run on the same shapes and kernel, plus one read of the patterns:
              full: (L - 1) x 2·B·N³  (bmm [B,N,N] @ [B,N,N]: the first layer composes without one)
              rows: (L - 1) x 2·B·T·N²  (baddbmm [B,T,N] @ [B,N,N], top-down)
              read: B·L·H·N² float32 values over the rate of a sum over the same tensor (the head
                    reduction and the per-layer row sums read every pattern at least once)
            It assumes the kernels run one after another (they do: each layer's row sums feed its
            matmul) and that a kernel timed alone and warm on the code's shape is as fast as that
            work can go on this device; it leaves out the elementwise scalings and the head
            reduction's writes, and counts dense FLOPs, as the code runs them (torch's matmul does
            not skip the causal zeros).  (The first floor used one 2048² matmul's rate for every
            shape, counted L matmuls, and divided the bytes read by a copy's rate, which moves each
            byte twice: it was not a lower bound, rows x floor came out 0.85 at N = 512, H = 16.)

Ratios: `x naive` is naive time / this time (higher is better); `x floor` is this
time / its floor (1.0 would be perfect).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# On a shared, oversubscribed CPU, OpenMP threads that spin while waiting for a descheduled
# peer make every small kernel cost a scheduler tick (we measured 4x on rows mode).  Every
# column runs under the same setting; export OMP_WAIT_POLICY=ACTIVE to time the default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after the OpenMP setting)

from attnflow import flow as F  # noqa: E402

B, L, T = 8, 24, 32


def make_patterns(N: int, H: int, device) -> torch.Tensor:
    """Random causal row-stochastic float32 patterns [B, L, H, N, N], built in place to spare memory."""
    g = torch.Generator(device=device).manual_seed(0)
    A = torch.rand(B, L, H, N, N, generator=g, device=device)
    A.tril_()
    A.div_(A.sum(-1, keepdim=True))
    return A


def naive_rollout(A: torch.Tensor, rows: int) -> torch.Tensor:
    """The per-example loop: full N×N products per layer, heads averaged first."""
    out = []
    for b in range(A.shape[0]):
        N = A.shape[-1]
        eye = torch.eye(N, device=A.device)
        R = eye
        for l in range(A.shape[1]):
            a = A[b, l].mean(0)
            a = 0.5 * a + 0.5 * eye
            a = a / a.sum(-1, keepdim=True)
            R = a @ R
        out.append(R[-rows:])
    return torch.stack(out)


class Timer:
    """Median wall time of `fn` over `repeats` runs (CUDA events on a GPU), after `warmup` runs."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, repeats: int, warmup: int = 0) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def read_time(A: torch.Tensor, timer: Timer) -> float:
    """Seconds to read A once: a sum over it, the cheapest kernel that touches every element."""
    return timer(lambda: A.sum(), repeats=5, warmup=1)


def matmul_rate(B: int, M: int, N: int, device: torch.device, timer: Timer) -> float:
    """FLOP/s of one layer's kernel of the code on its own shape: bmm [B, N, N] @ [B, N, N] into a preallocated
    output (full mode, M = N), or baddbmm [B, M, N] + [B, M, N] @ [B, N, N] (rows mode, M = T)."""
    x, y = torch.rand(B, M, N, device=device), torch.rand(B, N, N, device=device)
    if M == N:
        out = torch.empty(B, M, N, device=device)
        t = timer(lambda: torch.bmm(x, y, out=out), repeats=5, warmup=1)
    else:
        z = torch.rand(B, M, N, device=device)
        t = timer(lambda: torch.baddbmm(z, x, y), repeats=5, warmup=1)
    return 2 * B * M * N * N / t


def run(device: torch.device, quick: bool) -> None:
    timer = Timer(device)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads (OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}), "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(f"\n## {name}  (B={B}, L={L}, float32, rows = last {T}; floor rates are measured per shape, below the table)")
    print(
        f"| {'N':>5} | {'H':>2} | {'naive s':>8} | {'full s':>8} | {'x naive':>7} | {'full floor s':>12} | {'x floor':>7} "
        f"| {'rows s':>8} | {'x naive':>7} | {'rows floor s':>12} | {'x floor':>7} |"
    )
    print("|" + "|".join("-" * (w + 2) for w in (5, 2, 8, 8, 7, 12, 7, 8, 7, 12, 7)) + "|")
    shapes = [(256, 1), (512, 16), (1024, 1)] + ([] if quick else [(2048, 1)])
    rates: list[str] = []
    for N, H in shapes:
        slow_repeats = 1 if quick or N >= 2048 else 3
        A = make_patterns(N, H, device)
        rows = list(range(N - T, N))
        check = (F.rollout(A[:1, :4], rows=rows) - naive_rollout(A[:1, :4], T)).abs().max()  # cheap sanity check
        assert float(check) < 1e-4, f"rows mode disagrees with the naive loop by {float(check)}"
        t_naive = timer(lambda: naive_rollout(A, T), repeats=slow_repeats, warmup=0 if N >= 1024 else 1)
        t_full = timer(lambda: F.rollout(A), repeats=slow_repeats, warmup=0 if N >= 1024 else 1)
        t_rows = timer(lambda: F.rollout(A, rows=rows), repeats=3 if N >= 2048 else 7, warmup=1)
        t_read = read_time(A, timer)
        rate_full, rate_rows = matmul_rate(B, N, N, device, timer), matmul_rate(B, T, N, device, timer)
        flops_full, flops_rows = (L - 1) * 2 * B * N**3, (L - 1) * 2 * B * T * N**2  # what the code's matmuls do
        f_full = flops_full / rate_full + t_read
        f_rows = flops_rows / rate_rows + t_read
        rates.append(
            f"N={N} H={H}: read {A.numel() * 4 / t_read / 1e9:.1f} GB/s ({t_read:.3f} s); full {flops_full / 1e9:.0f} GFLOP "
            f"at {rate_full / 1e9:.0f} GFLOP/s; rows {flops_rows / 1e9:.1f} GFLOP at {rate_rows / 1e9:.0f} GFLOP/s"
        )
        print(
            f"| {N:>5} | {H:>2} | {t_naive:>8.3f} | {t_full:>8.3f} | {t_naive / t_full:>7.1f} | {f_full:>12.3f} | {t_full / f_full:>7.2f} "
            f"| {t_rows:>8.4f} | {t_naive / t_rows:>7.1f} | {f_rows:>12.4f} | {t_rows / f_rows:>7.2f} |",
            flush=True,
        )
        del A
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\nfloor kernels: " + "; ".join(rates))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="skip N=2048 and time the slow columns once")
    p.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device in ("all", "cpu"):
        run(torch.device("cpu"), args.quick)
    if args.device in ("all", "cuda"):
        if torch.cuda.is_available():
            run(torch.device("cuda"), args.quick)
        else:
            print("\n(no CUDA device: GPU table skipped)")


if __name__ == "__main__":
    main()
