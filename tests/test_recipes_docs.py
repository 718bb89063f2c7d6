"""The YAML blocks of the recipe pages run from the command line, as experiments on the tiny demo pipeline.

(The pages' Python blocks run in `test_docs.py`.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.docs_runner import run_experiment_yaml

RECIPES = Path(__file__).resolve().parents[1] / "docs" / "recipes"
YAML_BLOCK = re.compile(r"```yaml\n(.*?)```", re.S)


def test_daam_experiment_runs(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    (block,) = YAML_BLOCK.findall((RECIPES / "daam.md").read_text(encoding="utf-8"))
    assert yaml.safe_load(block)["trace"]["rules"][0]["with"]["mode"] == "daam"
    out = tmp_path / "daam"
    run_experiment_yaml(block, out)
    names = {p.name for p in out.rglob("*.png")}
    assert {"heatmap_01_cat.png", "heatmap_05_mat.png", "heatmap_grid.png"} <= names, names


def test_masactrl_experiments_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both YAML blocks of the MasaCtrl page (plain and mask-guided) run as one edit group each: two images,
    the edited calls MasaCtrl's start step and layer give, and a target that the masks change."""
    from PIL import Image

    torch.set_num_threads(2)
    plain, masked = YAML_BLOCK.findall((RECIPES / "masactrl.md").read_text(encoding="utf-8"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "masks").mkdir()
    fg = np.zeros((64, 64), dtype=np.uint8)
    fg[16:48, 16:48] = 255
    for name in ("source", "target"):
        Image.fromarray(fg).save(tmp_path / "masks" / f"{name}.png")
    targets = []
    for name, block in (("plain", plain), ("masked", masked)):
        spec = yaml.safe_load(block)
        steps, rule = spec["inputs"]["steps"], spec["trace"]["rules"][0]["with"]
        run = run_experiment_yaml(block, tmp_path / name)
        (item,) = run
        assert item.record["prompts"] == ["a photo of a cat", "a photo of a running cat"]
        folder = tmp_path / name / "items" / item.id
        edited = json.loads((folder / "masactrl" / "result.json").read_text())["result"]["edited_calls"]
        assert edited == (steps - rule["start_step"]) * (7 - rule["start_layer"])  # 7 self-attention blocks
        targets.append(np.asarray(Image.open(folder / "image_1.png")))
    assert not np.array_equal(*targets)
