"""The YAML blocks of the recipe pages run: experiments on the tiny demo pipeline, trace configs attached to it.

(The pages' Python blocks run in `test_docs.py`.)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from attntrace import Tracer

RECIPES = Path(__file__).resolve().parents[1] / "docs" / "recipes"
YAML_BLOCK = re.compile(r"```yaml\n(.*?)```", re.S)


def yaml_blocks(page: str) -> list[dict[str, Any]]:
    return [yaml.safe_load(b) for b in YAML_BLOCK.findall((RECIPES / page).read_text(encoding="utf-8"))]


@pytest.fixture(scope="module")
def demo_path() -> Path:  # the pipeline `attntrace:demo` names
    from attntrace.demo import build_demo_pipeline

    return build_demo_pipeline()


def test_daam_experiment_runs(tmp_path: Path) -> None:
    from attntrace import load_run
    from attntrace.cli import main

    torch.set_num_threads(2)
    (block,) = YAML_BLOCK.findall((RECIPES / "daam.md").read_text(encoding="utf-8"))
    assert yaml.safe_load(block)["trace"]["rules"][0]["with"]["mode"] == "daam"
    path = tmp_path / "daam.yaml"
    path.write_text(block)
    out = tmp_path / "run"
    assert main(["validate", str(path)]) == 0
    assert main(["run", str(path), "--no-progress", "--set", f"output={out}"]) == 0
    run = load_run(out)
    assert run.warnings == [], run.warnings
    names = {p.name for p in out.rglob("*.png")}
    assert {"heatmap_01_cat.png", "heatmap_05_mat.png", "heatmap_grid.png"} <= names, names


def test_masactrl_trace_config_runs(demo_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    torch.set_num_threads(2)
    (config,) = yaml_blocks("masactrl.md")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "masks").mkdir()
    fg = np.zeros((64, 64), dtype=np.uint8)
    fg[16:48, 16:48] = 255
    for name in ("source", "target"):
        Image.fromarray(fg).save(tmp_path / "masks" / f"{name}.png")
    tracer = Tracer(config)
    (masa,) = tracer.observers.values()
    pipe = StableDiffusionPipeline.from_pretrained(demo_path)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    with tracer.attach(pipe), torch.no_grad():
        pipe(["a cat", "a running cat"], latents=noise, num_inference_steps=6, height=128, width=128)
    assert masa.result()["edited_calls"] == (6 - 4) * (7 - 3)
