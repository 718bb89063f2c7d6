"""Benchmark: attntrace's DAAM mode and `masactrl` vs the reference implementations on the same pipeline.

    python benchmarks/bench_daam_masactrl.py --pipe tiny --runs 3 --out benchmarks/RESULTS_recipes.md

`--pipe tiny`: the SD1.5-architecture test pipeline (`tests/sd_pipes.py`: SD1.5's block layout, 16
transformer blocks, 8 heads, 77 text tokens; narrow widths), 128 px. `--pipe sd15`: SD1.5's real-size
architecture with random weights at 256 px (`bench.py`'s W3-sd15 pipeline; slow on CPU).
Each variant is one whole 10-step `pipe(...)` call with CFG 7.5; variants run interleaved and the
figures are medians. The references are the tests' processors written from each tool's definitions:
- DAAM: a processor on DAAM's layers computing probabilities the classic way (`get_attention_scores`
  + `bmm`, as DAAM's own processor) and adding per-head maps into per-(layer, head) sums;
- MasaCtrl: one processor on every attention module, explicit `softmax(q k^T * scale) v` everywhere (as
  MasaCtrl's registered forward computes every layer), target rows reading the source's keys/values.
Ratios are to the untraced pipeline of the same batch, and attntrace / reference.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attntrace import Tracer  # noqa: E402
from tests import sd_pipes  # noqa: E402
from tests.test_daam import DaamReference  # noqa: E402
from tests.test_masactrl import MutualReference  # noqa: E402

STEPS = 10


def build(kind: str) -> Any:
    if kind == "tiny":
        return sd_pipes.sd15(), 128
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench import build_sd15_pipeline

    pipe = build_sd15_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe, 256


def variants(pipe: Any, side: int) -> dict[str, Callable[[], Any]]:
    size = side // pipe.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    one = torch.randn(1, 4, size, size, generator=g)
    two = one.expand(2, -1, -1, -1).clone()
    prompt, prompts = "a red dog sitting on grass", ["a dog on grass", "a red dog sitting on grass"]

    def gen(p: Any, lat: torch.Tensor) -> Any:
        with torch.no_grad():
            return pipe(p, latents=lat, num_inference_steps=STEPS, guidance_scale=7.5, height=side, width=side,
                        output_type="latent").images  # fmt: skip

    def with_procs(procs: Any, p: Any, lat: torch.Tensor) -> Any:
        saved = pipe.unet.attn_processors
        pipe.unet.set_attn_processor(procs)
        try:
            return gen(p, lat)
        finally:
            pipe.unet.set_attn_processor(saved)

    def daam_ref() -> Any:
        ref = DaamReference(pipe)
        procs = dict(pipe.unet.attn_processors)
        located = {id(m): i for i, m in enumerate(ref.layers)}
        for name, module in pipe.unet.named_modules():
            if id(module) in located:
                procs[f"{name}.processor"] = ref.processor(located[id(module)])
        out = with_procs(procs, prompt, one)
        ref.global_map(pipe.tokenizer, prompt)
        return out

    def traced(rule: dict[str, Any], p: Any, lat: torch.Tensor, read: bool = False) -> Callable[[], Any]:
        def run() -> Any:
            tracer = Tracer()
            obs = tracer.add(**rule)
            with tracer.attach(pipe.unet):
                out = gen(p, lat)
            if read:
                obs.result()
            return out

        return run

    n_self = sum(1 for n in pipe.unet.attn_processors if n.endswith("attn1.processor"))
    mask = torch.zeros(16, 16)
    mask[4:12, 4:12] = 1
    masa = {"observer": "masactrl", "match": "*", "cfg": True, "start_step": 4, "start_layer": 10}
    return {
        "untraced, 1 image": lambda: gen(prompt, one),
        "DAAM reference": daam_ref,
        "heatmap mode: daam": traced({"observer": "heatmap", "match": "*attn2", "kind": "cross", "mode": "daam"},
                                     prompt, one, read=True),
        "heatmap mode: mean": traced({"observer": "heatmap", "match": "*attn2", "kind": "cross"}, prompt, one, True),
        "untraced, 2 images": lambda: gen(prompts, two),
        "MasaCtrl reference (explicit attention)": lambda: with_procs(
            MutualReference(n_self, start_step=4, start_layer=10, explicit=True), prompts, two),
        "MasaCtrl reference (SDPA)": lambda: with_procs(
            MutualReference(n_self, start_step=4, start_layer=10, explicit=False), prompts, two),
        "masactrl": traced(masa, prompts, two),
        "MasaCtrl mask reference (SDPA + explicit masked)": lambda: with_procs(
            MutualReference(n_self, start_step=4, start_layer=10, explicit=False, masks=(mask, mask)), prompts, two),
        "masactrl, mask-guided": traced({**masa, "mask_source": mask, "mask_target": mask}, prompts, two),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pipe", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe, side = build(args.pipe)
    runs = variants(pipe, side)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up round
        fn()
    for _ in range(args.runs):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    base1, base2 = med["untraced, 1 image"], med["untraced, 2 images"]
    pairs = {"heatmap mode: daam": "DAAM reference", "heatmap mode: mean": "DAAM reference",
             "masactrl": "MasaCtrl reference (explicit attention)",
             "masactrl, mask-guided": "MasaCtrl mask reference (SDPA + explicit masked)"}  # fmt: skip
    lines = [
        f"## DAAM / MasaCtrl recipes, pipe={args.pipe} ({side} px, {STEPS} steps, CFG 7.5), "
        f"{args.runs} interleaved runs + warm-up, {args.threads} threads, {platform.processor() or platform.machine()}",
        "",
        "| variant | median s | vs untraced | vs reference |",
        "|---|---|---|---|",
    ]
    for name, t in med.items():
        base = base1 if name in ("untraced, 1 image", "DAAM reference") or "heatmap" in name else base2
        ref = f"{t / med[pairs[name]]:.3f}" if name in pairs else ""
        lines.append(f"| {name} | {t:.2f} | {t / base:.3f} | {ref} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with args.out.open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
