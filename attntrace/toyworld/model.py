"""The shipped toy-world pipelines: load them, or build random-weight twins of the same architectures.

Two models of one world: `load_pipeline()` (a `StableDiffusionPipeline`, UNet with cross-attention) and
`load_joint_pipeline()` (a `StableDiffusion3Pipeline`, transformer with joint attention). `denoiser`
and `call_kwargs` hide the difference from code that runs either.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..core.errors import RunError

__all__ = [
    "JOINT_MODEL_DIR",
    "MODEL_DIR",
    "call_kwargs",
    "denoiser",
    "joint_model_dir",
    "load_joint_pipeline",
    "load_pipeline",
    "model_dir",
    "random_joint_pipeline",
    "random_pipeline",
    "training_record",
]

# `from_pretrained` folders (model_index.json, tokenizer(s), text encoder(s), vae, unet/transformer, scheduler).
MODEL_DIR = Path(__file__).resolve().parent.parent / "data" / "toyworld" / "sd"
JOINT_MODEL_DIR = Path(__file__).resolve().parent.parent / "data" / "toyworld" / "sd3"


def _folder(env: str, default: Path, script: str) -> Path:
    folder = Path(os.environ.get(env) or default)
    if not (folder / "model_index.json").is_file():
        raise RunError(
            f"toy-world model not found in {folder}; train one with "
            f"`python -m attntrace.toyworld.{script} --out DIR` and set {env}=DIR"
        )
    return folder


def model_dir() -> Path:
    """The shipped pipeline's folder (`ATTNTRACE_TOYWORLD` overrides it, e.g. for a fresh training)."""
    return _folder("ATTNTRACE_TOYWORLD", MODEL_DIR, "train")


def joint_model_dir() -> Path:
    """The shipped joint-attention pipeline's folder (`ATTNTRACE_TOYWORLD_JOINT` overrides it)."""
    return _folder("ATTNTRACE_TOYWORLD_JOINT", JOINT_MODEL_DIR, "train_joint")


def denoiser(pipe: Any) -> Any:
    """The pipeline's denoising network: its UNet, or its transformer."""
    net = getattr(pipe, "unet", None)
    return net if net is not None else pipe.transformer


def call_kwargs(pipe: Any) -> dict[str, Any]:
    """Extra pipeline-call arguments the toy model was trained for.

    The joint model has no T5 (`text_encoder_3=None`), so SD3 would append `max_sequence_length` zero text
    tokens (256 by default) it never saw in training: it is called with none.
    """
    if hasattr(pipe, "text_encoder_3") and pipe.text_encoder_3 is None:
        return {"max_sequence_length": 0}
    return {}


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


def load_joint_pipeline(path: str | Path | None = None) -> Any:
    """The trained joint-attention toy-world `StableDiffusion3Pipeline` (float32, CPU, progress bar off).

    Call it with `**call_kwargs(pipe)` (`max_sequence_length=0`): it was trained without T5's tokens.
    """
    _offline()
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(
        str(path or joint_model_dir()), text_encoder_3=None, tokenizer_3=None
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_joint_pipeline(seed: int = 0, path: str | Path | None = None) -> Any:
    """The joint pipeline with a random transformer and text encoders (seeded); tokenizers, VAE kept."""
    import torch
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    pipe = load_joint_pipeline(path)
    folder = Path(path or joint_model_dir())
    torch.manual_seed(seed)
    pipe.transformer = SD3Transformer2DModel.from_config(dict(pipe.transformer.config)).eval()
    for name in ("text_encoder", "text_encoder_2"):
        config = CLIPTextConfig.from_pretrained(folder / name)
        setattr(pipe, name, CLIPTextModelWithProjection(config).eval())
    return pipe


def training_record(path: str | Path | None = None) -> dict[str, Any]:
    """The `training.json` written next to the weights (settings, time taken, metrics)."""
    return json.loads((Path(path or model_dir()) / "training.json").read_text())
