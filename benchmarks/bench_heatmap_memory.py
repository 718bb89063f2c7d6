"""Peak extra memory of `heatmap` after 10 vs 50 forwards of a small SD-like UNet (must not grow).

CPU: each configuration runs in a fresh subprocess; "extra" is the peak resident set size with the
heatmap minus the peak without any tracer, after the same number of forwards. The bytes the observer
holds (its running sums) are reported exactly. CUDA (if available, `--device cuda`): extra peak is
`torch.cuda.max_memory_allocated` with the heatmap minus without, in one process.

    PYTHONPATH=. python benchmarks/bench_heatmap_memory.py [--device cpu|cuda] [--steps 10 50]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
import warnings
from typing import Any

import torch


def build(device: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128, 256), layers_per_block=1, cross_attention_dim=256, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), sample_size=32,
        norm_num_groups=32,
    ).eval().to(device)  # fmt: skip
    inputs = {"sample": torch.randn(2, 4, 32, 32, device=device), "timestep": torch.tensor(10, device=device),
              "encoder_hidden_states": torch.randn(2, 77, 256, device=device)}  # fmt: skip
    return unet, inputs


def forwards(unet: torch.nn.Module, inputs: dict[str, Any], n: int, heatmap: bool) -> dict[str, Any]:
    from attntrace import Tracer

    tracer = Tracer()
    hm = tracer.add("heatmap", match="*attn2", resolution=64) if heatmap else None
    t0 = time.perf_counter()
    if hm is None:
        with torch.no_grad():
            for _ in range(n):
                unet(**inputs)
    else:
        with tracer.attach(unet), torch.no_grad():
            for _ in range(n):
                unet(**inputs)
    out: dict[str, Any] = {"seconds": time.perf_counter() - t0}
    if hm is not None:
        res = hm.result()
        out["held_bytes"] = sum(s.numel() * s.element_size() for s, _ in hm.sums.values())
        out["held_tensors"] = len(hm.sums)
        out["count"] = res["count"]
        out["map_shape"] = list(res["maps"].shape)
    return out


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def worker(n: int, heatmap: bool) -> None:
    torch.set_num_threads(1)
    unet, inputs = build("cpu")
    with torch.no_grad():
        unet(**inputs)  # warm-up allocations before measuring either way
    out = forwards(unet, inputs, n, heatmap)
    out["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Current resident set after the run (the observer still holds its sums) and live tensors.
    with open("/proc/self/statm") as f:
        out["rss_end_mib"] = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    out["live_tensors"] = _live_tensors()
    print(json.dumps(out))


def cpu(steps: list[int]) -> None:
    rows = []
    for n in steps:
        res = {}
        for hm in (False, True):
            cmd = [sys.executable, __file__, "--worker", str(n)] + (["--heatmap"] if hm else [])
            res[hm] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        no, hm = res[False], res[True]
        rows.append((n, no["maxrss_mib"], hm["maxrss_mib"], hm["maxrss_mib"] - no["maxrss_mib"],
                     hm["rss_end_mib"] - no["rss_end_mib"], hm["live_tensors"] - no["live_tensors"],
                     hm["held_bytes"], hm["count"], no["seconds"], hm["seconds"]))  # fmt: skip
    print("| forwards | peak RSS no tracer (MiB) | peak RSS heatmap (MiB) | extra peak (MiB) | "
          "extra RSS at end (MiB) | extra live tensors | held bytes | calls summed | s no tracer | "
          "s heatmap |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.1f} | {r[2]:.1f} | {r[3]:+.1f} | {r[4]:+.1f} | {r[5]} | {r[6]} | {r[7]} "
              f"| {r[8]:.1f} | {r[9]:.1f} |")


def cuda(steps: list[int]) -> None:
    unet, inputs = build("cuda")
    with torch.no_grad():
        unet(**inputs)
    print("| forwards | peak alloc no tracer (MiB) | peak alloc heatmap (MiB) | extra (MiB) | held bytes |")
    print("|---|---|---|---|---|")
    for n in steps:
        peaks = {}
        held = 0
        for hm in (False, True):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = forwards(unet, inputs, n, hm)
            torch.cuda.synchronize()
            peaks[hm] = (torch.cuda.max_memory_allocated() - base) / 2**20
            held = out.get("held_bytes", held)
        extra = peaks[True] - peaks[False]
        print(f"| {n} | {peaks[False]:.2f} | {peaks[True]:.2f} | {extra:+.2f} | {held} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--worker", type=int)
    ap.add_argument("--heatmap", action="store_true")
    a = ap.parse_args()
    if a.worker is not None:
        worker(a.worker, a.heatmap)
    elif a.device == "cuda":
        cuda(a.steps)
    else:
        cpu(a.steps)


if __name__ == "__main__":
    main()
