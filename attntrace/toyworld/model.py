"""The shipped toy-world pipeline: load it, or build a random-weight twin of the same architecture."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..core.errors import RunError

__all__ = ["MODEL_DIR", "load_pipeline", "model_dir", "random_pipeline", "training_record"]

# A `from_pretrained` folder (model_index.json, tokenizer, text_encoder, vae, unet, scheduler).
MODEL_DIR = Path(__file__).resolve().parent.parent / "data" / "toyworld" / "sd"


def model_dir() -> Path:
    """The shipped pipeline's folder (`ATTNTRACE_TOYWORLD` overrides it, e.g. for a fresh training)."""
    folder = Path(os.environ.get("ATTNTRACE_TOYWORLD") or MODEL_DIR)
    if not (folder / "model_index.json").is_file():
        raise RunError(
            f"toy-world model not found in {folder}; train one with "
            "`python -m attntrace.toyworld.train --out DIR` and set ATTNTRACE_TOYWORLD=DIR"
        )
    return folder


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never ask the hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_pipeline(path: str | Path | None = None) -> Any:
    """The trained toy-world `StableDiffusionPipeline` (float32, CPU, progress bar off)."""
    _offline()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path or model_dir()), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_pipeline(seed: int = 0, path: str | Path | None = None) -> Any:
    """The same pipeline with a random UNet and text encoder (seeded); tokenizer, VAE, scheduler kept.

    The baseline every semantic test must fail on: the same architecture, token layout and decoder,
    only the learned text-to-image mapping is gone.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    pipe = load_pipeline(path)
    folder = Path(path or model_dir())
    torch.manual_seed(seed)
    pipe.unet = UNet2DConditionModel.from_config(dict(pipe.unet.config)).eval()
    pipe.text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")).eval()
    return pipe


def training_record(path: str | Path | None = None) -> dict[str, Any]:
    """The `training.json` written next to the weights (settings, time taken, metrics)."""
    return json.loads((Path(path or model_dir()) / "training.json").read_text())
