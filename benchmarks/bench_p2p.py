"""Benchmark: each prompt-to-prompt recipe in attntrace vs the reference P2P controller, same pipeline.

    python benchmarks/bench_p2p.py --runs 3 --out benchmarks/RESULTS_p2p.md

The pipeline is tests/tiny_pipes.py's SD1.5-architecture pipeline (random weights) at `--size` px,
10 DDIM steps, CFG 7.5, two or three prompts. The reference is tests/p2p_reference.py: P2P's
controllers registered as a processor on every attention module, sampled with P2P's own loop (its
`text2image_ldm_stable`). attntrace runs the same recipe through `pipe(...)` under a tracer.
Variants run interleaved after one warm-up round; the figures are medians of wall time; the ratio
is attntrace / reference (below 1: attntrace is cheaper). Both sides get the same start latent.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attntrace import Tracer  # noqa: E402
from tests import p2p_reference as ref  # noqa: E402
from tests import test_p2p_parity as parity  # noqa: E402
from tests import tiny_pipes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (latents: size / 8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--classic", action="store_true", help="classic attention processors on both sides")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = tiny_pipes.sd15(classic=args.classic)
    side = args.size // 8
    parity.SIDE = side
    latent = torch.randn((1, 4, side, side), generator=torch.Generator().manual_seed(0))
    steps = parity.STEPS
    rows = []
    for name in parity.NAMES:
        prompts, _, rules = parity.recipes(pipe.tokenizer)[name]

        def run_ref(name: str = name) -> None:
            controller = parity.recipes(pipe.tokenizer)[name][1]
            ref.sample(pipe, list(parity.recipes(pipe.tokenizer)[name][0]), controller, latent, steps)

        # Attached once, as a user does for a session of generations; each pipe call is its own
        # generation (steps restart at 0). The attach/detach cost is timed on its own.
        tracer = Tracer({"rules": rules})

        def run_ours(prompts: list[str] = prompts) -> None:
            pipe(prompts, latents=latent.expand(len(prompts), -1, -1, -1), num_inference_steps=steps,
                 guidance_scale=7.5, output_type="latent")  # fmt: skip

        times: dict[str, list[float]] = {"reference": [], "attntrace": [], "attach": []}
        for rnd in range(args.runs + 1):
            t0 = time.perf_counter()
            run_ref()
            if rnd:  # round 0 warms up
                times["reference"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            tracer.attach(pipe)
            t1 = time.perf_counter()
            run_ours()
            t2 = time.perf_counter()
            tracer.detach()
            if rnd:
                times["attntrace"].append(t2 - t1)
                times["attach"].append(t1 - t0 + time.perf_counter() - t2)
        r, a = statistics.median(times["reference"]), statistics.median(times["attntrace"])
        at = statistics.median(times["attach"])
        rows.append((name, r, a, a / r, at))
        print(f"{name}: reference {r:.2f} s, attntrace {a:.2f} s, ratio {a / r:.3f}, attach {at:.2f} s", flush=True)
    lines = [
        f"## prompt-to-prompt recipes, attntrace vs reference controller ({args.size} px, {steps} steps, "
        f"{'classic' if args.classic else 'SDPA'} processors)",
        "",
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
        f"median of {args.runs} interleaved runs after a warm-up.",
        "",
        "| recipe | reference (s) | attntrace (s) | ratio | attach + detach, once per session (s) |",
        "|---|---|---|---|---|",
        *[f"| {n} | {r:.2f} | {a:.2f} | {x:.3f} | {at:.2f} |" for n, r, a, x, at in rows],
        "",
    ]
    if args.out:
        with args.out.open("a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
