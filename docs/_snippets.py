"""Tiny random-weight models used by the code blocks of these docs (so every block runs in CI in seconds).

In your own code, load a real model instead, e.g.
`UNet2DConditionModel.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", subfolder="unet")`.
"""

from __future__ import annotations

from typing import Any

import torch


def tiny_unet() -> tuple[torch.nn.Module, dict[str, Any]]:
    """A two-block SD1.5-shaped UNet (random weights) and one set of inputs (batch 2, 7 text tokens)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=16, norm_num_groups=8,
    ).eval()  # fmt: skip
    inputs = {"sample": torch.randn(2, 4, 16, 16), "timestep": torch.tensor(10),
              "encoder_hidden_states": torch.randn(2, 7, 32)}  # fmt: skip
    return unet, inputs


def demo_run(output: str = "runs/docs-demo") -> str:
    """Run a small experiment (heatmap + stats, 2 steps at 64 px) on the offline demo pipeline; its folder."""
    from attntrace.experiment.runner import run_experiment
    from attntrace.experiment.spec import Experiment

    exp = Experiment.from_data({
        "name": "docs-demo",
        "model": {"pipeline": "StableDiffusionPipeline", "path": "attntrace:demo"},
        "inputs": {"prompts": ["a cat sitting on a mat"], "steps": 2, "height": 64, "width": 64},
        "trace": {"rules": [{"use": "heatmap", "match": "*attn2"}, {"use": "stats", "match": "*attn2"}]},
        "output": output,
    })  # fmt: skip
    return str(run_experiment(exp, progress=False).directory)
