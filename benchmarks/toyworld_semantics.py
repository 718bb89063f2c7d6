"""The measurements behind the toy-world semantic tests' thresholds: trained model vs random twin.

Runs exactly what `tests/toyworld/test_toyworld_semantics.py` runs (same prompts, seeds, steps) on the
shipped model and on a random-weight twin of the same architecture, and prints one table.

    PYTHONPATH=. python benchmarks/toyworld_semantics.py > benchmarks/RESULTS_toyworld.md
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "toyworld"))

from test_toyworld_semantics import EDIT_PROMPTS

from attntrace.toyworld.model import (
    load_joint_pipeline,
    load_pipeline,
    random_joint_pipeline,
    random_pipeline,
    training_record,
)
from attntrace.toyworld.semantics import (
    heldout_prompts,
    measure_ablation,
    measure_localisation,
    measure_reweight,
    measure_swap,
)


def main() -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    prompts = heldout_prompts(24)
    rows: list[tuple[str, str, str]] = []
    pipes = {"trained": load_pipeline(), "random": random_pipeline(seed=0)}
    loc = {"trained": measure_localisation(pipes["trained"], prompts)}
    loc["random"] = measure_localisation(pipes["random"], prompts, masks=loc["trained"].masks)
    for key, label in (
        ("cond_pointing", "pointing, conditional maps"),
        ("cond_miou", "top-region mIoU, conditional maps"),
        ("uncond_pointing", "pointing, unconditional maps"),
        ("uncond_miou", "top-region mIoU, unconditional maps"),
        ("next_token_pointing", "pointing, labels one token late"),
        ("prev_token_pointing", "pointing, labels one token early (the colour word)"),
        ("n", "scored (image, shape word) pairs"),
    ):
        rows.append((label, f"{getattr(loc['trained'], key):.3f}", f"{getattr(loc['random'], key):.3f}"))
    sw = {k: measure_swap(p) for k, p in pipes.items()}
    for key, label in (
        ("mean_iou", "word swap: mean mask IoU source -> edited (P2P)"),
        ("min_iou", "word swap: min mask IoU source -> edited (P2P)"),
        ("mean_iou_without_p2p", "word swap: mean mask IoU, same noise without P2P"),
        ("changed", "word swap: edited image shows the target's objects"),
        ("colour_changed", "colour swaps: edited image has the target colour, not the source's"),
        ("shape_changed", "shape swaps: edited image shows the target's objects"),
    ):
        rows.append((label, f"{sw['trained'][key]:.3f}", f"{sw['random'][key]:.3f}"))
    rw = {k: measure_reweight(p, EDIT_PROMPTS, factor=2.0) for k, p in pipes.items()}
    rows.append(("reweight colour word x2: mean colour-share ratio", *(f"{rw[k]['mean_ratio']:.3f}" for k in pipes)))
    rows.append(("reweight colour word x2: share raised", *(f"{rw[k]['raised']:.3f}" for k in pipes)))
    ab = {k: measure_ablation(p, EDIT_PROMPTS) for k, p in pipes.items()}
    rows.append(("prompt following, no edit", *(f"{ab[k]['following']:.3f}" for k in pipes)))
    rows.append(("named colours drawn, no edit", *(f"{ab[k]['colours']:.3f}" for k in pipes)))
    rows.append(("named colours drawn, every cross head ablated", *(f"{ab[k]['colours_ablated']:.3f}" for k in pipes)))
    rows.append(("prompt following, every cross head ablated", *(f"{ab[k]['following_ablated']:.3f}" for k in pipes)))
    rows.append(
        (
            "max pixel difference between prompts, ablated",
            *(f"{ab[k]['max_difference_between_prompts_ablated']:.2e}" for k in pipes),
        )
    )
    joint = {"trained": load_joint_pipeline(), "random": random_joint_pipeline(seed=0)}
    jl = {"trained": measure_localisation(joint["trained"], prompts)}
    jl["random"] = measure_localisation(joint["random"], prompts, masks=jl["trained"].masks)
    for key, label in (
        ("cond_pointing", "joint model: pointing, conditional maps"),
        ("cond_miou", "joint model: top-region mIoU, conditional maps"),
        ("uncond_pointing", "joint model: pointing, unconditional maps"),
        ("next_token_pointing", "joint model: pointing, labels one token late"),
        ("prev_token_pointing", "joint model: pointing, labels one token early (the colour word)"),
        ("n", "joint model: scored (image, shape word) pairs"),
    ):
        rows.append((label, f"{getattr(jl['trained'], key):.3f}", f"{getattr(jl['random'], key):.3f}"))
    rec = training_record()
    print("# Toy-world semantic measurements (what the semantic tests' thresholds come from)\n")
    print(
        f"Shipped model: prompt following {rec['prompt_following']['rate']:.3f} on "
        f"{rec['prompt_following']['n']} held-out captions at training time. Checks: 24 held-out captions, "
        "seed 0, 20 DDIM steps, CFG 5; random twin = same tokenizer/VAE/scheduler, random UNet and text encoder.\n"
    )
    print("| measurement | trained | random twin |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    print(f"\n({time.perf_counter() - t0:.0f} s, 1 thread)")


if __name__ == "__main__":
    main()
