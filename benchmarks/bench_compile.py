"""torch.compile on W1: graph breaks and compiled traced vs compiled untraced time (issue 7).

    python benchmarks/bench_compile.py --runs 9 --out benchmarks/RESULTS.md

Two copies of the W1 UNet with the same weights: one compiled as is, one compiled with a tracer
attached (passive observers: `shapes` on every site and a q/k/v reader). Both use the default
Inductor backend. Dynamo's `explain` counts the graph breaks of the traced copy; the timed runs are
interleaved after compilation and warm-up, medians reported.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch._dynamo as dynamo
from bench import ReadQKV, build_unet, publish

from attntrace import Tracer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    plain, inputs = build_unet("W1")
    traced = copy.deepcopy(plain)
    tracer = Tracer({"rules": [{"use": "shapes"}]})
    reader = tracer.add(ReadQKV())
    attachment = tracer.attach(traced)

    def fwd(model: torch.nn.Module) -> torch.Tensor:
        return model(**inputs, return_dict=False)[0]

    with torch.no_grad():
        dynamo.reset()
        explanation = dynamo.explain(lambda: fwd(traced))()
        dynamo.reset()
        eager_plain = fwd(plain)
        eager_traced = fwd(traced)
        variants = {
            "compiled untraced": torch.compile(plain, backend=args.backend),
            "compiled traced (shapes + q/k/v reader)": torch.compile(traced, backend=args.backend),
        }
        compile_s = {}
        outs = {}
        for name, model in variants.items():
            t0 = time.perf_counter()
            outs[name] = fwd(model)
            compile_s[name] = time.perf_counter() - t0
            fwd(model)
        calls_before = reader.n
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.runs):
            for name, model in variants.items():
                t0 = time.perf_counter()
                fwd(model)
                times[name].append(time.perf_counter() - t0)
        observed_per_run = (reader.n - calls_before) / args.runs
    attachment.detach()
    n_sites = len(attachment.sites)
    base = statistics.median(times["compiled untraced"])
    diff = float((outs["compiled traced (shapes + q/k/v reader)"] - outs["compiled untraced"]).abs().max())
    lines = [
        f"### torch.compile (backend {args.backend}) — W1, {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.runs} interleaved runs, {time.strftime('%Y-%m-%d')}",
        "",
        f"Graph breaks in the traced UNet (dynamo.explain): {explanation.graph_break_count}; graphs: "
        f"{explanation.graph_count}. Eager traced == eager untraced: {torch.equal(eager_plain, eager_traced)}; "
        f"compiled traced vs compiled untraced max abs diff: {diff:.1e}. The q/k/v reader saw "
        f"{observed_per_run:.0f} calls per compiled forward ({n_sites} sites).",
        "",
        "| variant | first call (compile) s | median s | ratio |",
        "|---|---|---|---|",
    ]
    for name in variants:
        med = statistics.median(times[name])
        lines.append(f"| {name} | {compile_s[name]:.1f} | {med:.4f} | {med / base:.3f} |")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
