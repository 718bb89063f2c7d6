"""Peak extra memory of the `stats` observer on one 4096-token self-attention call (CPU).

The call has batch 2 x 8 heads x 4096 query/key tokens x head dim 40 (SD1.5's 64x64 latent level):
its full float32 probability map is 2*8*4096*4096*4 B = 1 GiB. Each case runs in a fresh process;
the peak resident set (Linux `VmHWM`, reset through `/proc/self/clear_refs` after the inputs exist)
minus the resident set before the call is the extra memory the case needed.

    python benchmarks/bench_stats_memory.py            # all cases, a table on stdout
    python benchmarks/bench_stats_memory.py --case stats --mib 256
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

B, H, L, D = 2, 8, 4096, 40
FULL_MAP_MIB = B * H * L * L * 4 / 2**20


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")


def run_case(case: str, mib: float) -> dict[str, float]:
    import torch

    torch.set_num_threads(2)
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from attntrace.core.call import AttentionCall
    from attntrace.core.layout import Layout
    from attntrace.core.site import Site
    from attntrace.observers.stats import Stats

    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    site = Site("bench.attn1", "self", torch.nn.Identity(), "bench")

    def kernel(q2: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor, m2: torch.Tensor | None) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q2, k2, v2, attn_mask=m2)

    call = AttentionCall(
        site=site, step=0, timestep=None, query=q, key=k, value=v, attn_mask=None, scale=None,
        is_causal=False, enable_gqa=False, kernel_fn=kernel, layout=Layout("self", image=slice(0, L), grid=(1, 64, 64)),
    )  # fmt: skip
    stats = Stats(max_chunk_mib=mib)
    # Warm up allocator/threads on a small call so one-off costs do not count.
    small = AttentionCall(
        site=site, step=0, timestep=None, query=q[:, :, :64], key=k[:, :, :64], value=v[:, :, :64],
        attn_mask=None, scale=None, is_causal=False, enable_gqa=False, kernel_fn=kernel,
    )  # fmt: skip
    Stats(max_chunk_mib=mib).on_call(small)
    base = _rss_kib("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    if case == "stats":
        stats.on_call(call)
    elif case == "full":  # what a naive observer does: the whole map, then the same statistics
        p = call.probs
        _ = (-(p * p.clamp_min(1e-30).log()).sum(-1)).mean(-1), p.amax(-1).mean(-1)
    else:
        raise SystemExit(f"unknown case {case}")
    seconds = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    return {"case": case, "budget_mib": mib, "peak_extra_mib": (peak - base) / 1024, "seconds": seconds,
            "rows": len(stats.rows)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--case", choices=["stats", "full"])
    ap.add_argument("--mib", type=float, default=256.0)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.mib)))
        return
    print(f"self-attention B={B} H={H} L={L} D={D}; full fp32 map = {FULL_MAP_MIB:.0f} MiB")
    print(f"{'case':<8} {'budget MiB':>10} {'peak extra MiB':>15} {'seconds':>8}")
    for case, mib in [("stats", 256.0), ("stats", 64.0), ("stats", 1024.0), ("full", 256.0)]:
        cmd = [sys.executable, __file__, "--case", case, "--mib", str(mib)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        budget = f"{mib:.0f}" if case == "stats" else "-"
        print(f"{case:<8} {budget:>10} {r['peak_extra_mib']:>15.1f} {r['seconds']:>8.2f}")


if __name__ == "__main__":
    main()
