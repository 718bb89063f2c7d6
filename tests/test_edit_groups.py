"""Edit groups from YAML and Python: a source and edited prompts as one batch from the same start latents;
a P2P experiment is never a silent no-op; editors learn the group and CFG layout from the pipeline call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from attntrace import ConfigError, Tracer
from attntrace.experiment import Experiment
from attntrace.experiment.runner import plan_items, run_experiment
from tests import tiny_pipes


@pytest.fixture(scope="module")
def pipeline_dir(demo_pipeline_dir: Path) -> Path:
    return demo_pipeline_dir


def experiment(pipeline_dir: Path, out: Path, prompts: list[Any], rules: list[dict[str, Any]]) -> Experiment:
    text = yaml.safe_dump({
        "name": "p2p",
        "model": {"pipeline": "StableDiffusionPipeline", "path": str(pipeline_dir), "device": "cpu"},
        "inputs": {"prompts": prompts, "seeds": [0], "steps": 3, "guidance_scale": 7.5, "height": 64, "width": 64},
        "trace": {"rules": rules},
        "output": str(out),
    })  # fmt: skip
    return Experiment.from_data(yaml.safe_load(text))


REPLACE = [{"use": "replace", "with": {"cross_replace_steps": 0.8, "self_replace_steps": 0.4}}]


def test_single_prompts_with_replace_are_an_error(pipeline_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        experiment(pipeline_dir, tmp_path, ["a cat on a mat", "a dog on a mat"], REPLACE)
    msg = str(info.value)
    assert msg.startswith("inputs.prompts.0: trace.rules.0 (replace)") and "[source, edited]" in msg
    with pytest.raises(ConfigError, match="needs a source and at least one edited prompt"):
        experiment(pipeline_dir, tmp_path, [["a cat on a mat"]], REPLACE)


def images(run_dir: Path) -> list[np.ndarray]:
    files = sorted((run_dir / "items" / "p000-s0").glob("image*.png"))
    return [np.asarray(Image.open(f)) for f in files]


def test_yaml_group_runs_as_one_batch_and_edits(pipeline_dir: Path, tmp_path: Path) -> None:
    group = ["a cat on a mat", "a dog on a mat"]
    exp = experiment(pipeline_dir, tmp_path / "edit", [group], REPLACE)
    (item,) = plan_items(exp)
    assert item.group == tuple(group)
    run_experiment(exp, progress=False)
    edited = images(tmp_path / "edit")
    same = experiment(pipeline_dir, tmp_path / "mapping", [{"source": group[0], "edits": [group[1]]}],
                      [{"use": "shapes", "match": "*"}])  # fmt: skip
    run_experiment(same, progress=False)
    plain = images(tmp_path / "mapping")
    assert len(edited) == len(plain) == 2
    # The source image is the same with or without the edit; the edited image is changed by it.
    assert np.abs(edited[0].astype(int) - plain[0].astype(int)).max() <= 1
    assert np.abs(edited[1].astype(int) - plain[1].astype(int)).max() > 2


def test_python_group_in_few_lines() -> None:
    pipe = tiny_pipes.sd15()
    tracer = Tracer()
    tracer.add("replace", cross_replace_steps=0.8, self_replace_steps=0.4)
    with tracer.attach(pipe):
        out = pipe(["a cat riding a bicycle", "a dog riding a bicycle"], num_inference_steps=3, height=64,
                   width=64, output_type="latent", generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    g = tracer.generations[0]
    assert g.group == (0, 1) and g.cfg and g.num_steps == 3
    # Guidance-free call: the editors learn there is no unconditional half (no cfg flag to get wrong).
    with tracer.attach(pipe):
        pipe(["a cat riding a bicycle", "a dog riding a bicycle"], num_inference_steps=3, height=64, width=64,
             guidance_scale=1.0, output_type="latent")  # fmt: skip
    assert tracer.generations[0].cfg is False
    assert out.shape[0] == 2


def test_nothing_to_edit_warns() -> None:
    pipe = tiny_pipes.sd15()
    tracer = Tracer()
    tracer.add("replace")
    with tracer.attach(pipe), pytest.warns(RuntimeWarning, match="replace had nothing to edit"):
        pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="latent")


MASA = [{"use": "masactrl", "match": "*", "with": {"start_step": 1, "start_layer": 3}}]


def test_masactrl_single_prompt_is_an_error(pipeline_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        experiment(pipeline_dir, tmp_path, ["a cat on a mat"], MASA)
    assert str(info.value).startswith("inputs.prompts.0: trace.rules.0 (masactrl)")


def test_masactrl_from_yaml_equals_python(pipeline_dir: Path, tmp_path: Path) -> None:
    """`attntrace run` on an edit group with a masactrl rule gives the final latents and images of the Python
    API's MasaCtrl run on the same weights, seed and start latents (one noise expanded to both images)."""
    from diffusers import StableDiffusionPipeline

    from attntrace.cli import main

    torch.set_num_threads(1)
    group = ["a cat on a mat", "a running cat on a mat"]
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    decoded: list[torch.Tensor] = []  # the final latents, as the VAE decoder receives them
    pipe.vae.post_quant_conv.register_forward_pre_hook(lambda m, args: decoded.append(args[0].clone()))

    side = 64 // pipe.vae_scale_factor
    noise = torch.randn(1, pipe.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(0))
    tracer = Tracer()
    masa = tracer.add("masactrl", match="*", start_step=1, start_layer=3)
    with tracer.attach(pipe), torch.no_grad():
        python = pipe(group, latents=noise.expand(2, -1, -1, -1), num_inference_steps=3, guidance_scale=7.5,
                      height=64, width=64).images  # fmt: skip
    assert masa.result()["edited_calls"] == (3 - 1) * (7 - 3)
    with torch.no_grad():
        plain = pipe(group, latents=noise.expand(2, -1, -1, -1), num_inference_steps=3, height=64, width=64).images
    python_latents, plain_latents = decoded[0], decoded[1]

    # From the experiment API with the same pipeline object (to read its latents) ...
    exp = experiment(pipeline_dir, tmp_path / "api", [group], MASA)
    run_experiment(exp, progress=False, model=(pipe, None))
    assert torch.equal(decoded[2], python_latents)
    assert not torch.equal(python_latents[1], plain_latents[1]) and torch.equal(python_latents[0], plain_latents[0])
    # ... and from the command line, which loads the pipeline itself: the same images.
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment(pipeline_dir, tmp_path / "cli", [group], MASA).dump()))
    assert main(["run", str(path), "--no-progress"]) == 0
    saved = images(tmp_path / "cli")
    assert [np.array_equal(a, np.asarray(b)) for a, b in zip(saved, python)] == [True, True]
    assert not np.array_equal(saved[1], np.asarray(plain[1]))
    record = json.loads((tmp_path / "cli" / "manifest.json").read_text())["items"]["p000-s0"]
    assert record["prompts"] == group and not record.get("warnings")
    result = json.loads((tmp_path / "cli" / "items" / "p000-s0" / "masactrl" / "result.json").read_text())
    assert result["result"]["edited_calls"] == (3 - 1) * (7 - 3)
