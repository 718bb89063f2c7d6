"""Experiment spec validation and the runner, in process, on a tiny pipeline loaded from disk by path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

import attntrace
from attntrace import ConfigError, Observer, RunError
from attntrace.core.kernel import attention_probs
from attntrace.experiment import Experiment, apply_overrides, experiment_schema, load_experiment
from attntrace.experiment.runner import plan_items, read_manifest, run_experiment

pytest.importorskip("diffusers")


class Probe(Observer):
    """Test observer: per site, the mean of probs@value minus the kernel output, plus a tiny plot.

    Keeps one float per (site, step): grows with sites x steps.
    """

    name = "probe"
    needs = frozenset({"probs", "output", "value"})
    interrupt_on_prompt: ClassVar[str | None] = None

    def __init__(self, params: Any = None, **kw: Any) -> None:
        super().__init__(params, **kw)
        self.rows: list[dict[str, Any]] = []
        self.prompt: str | None = None

    def set_context(self, prompt: str, tokens: list[str] | None, item: str) -> None:
        self.prompt = prompt

    def on_call(self, call: Any) -> None:
        if Probe.interrupt_on_prompt is not None and self.prompt == Probe.interrupt_on_prompt:
            raise KeyboardInterrupt
        p = call.probs
        # An independent recomputation: the probabilities times value must give the kernel's output.
        err = float((p @ call.value.float() - call.output.float()).abs().max())
        ref = attention_probs(call.query, call.key, call.attn_mask, scale=call.scale)
        self.rows.append(
            {
                "site": call.site,
                "step": call.step,
                "err": err,
                "probs_vs_ref": float((p - ref).abs().max()),
                "rowsum": float(p.sum(-1).mean()),
            }
        )

    def result(self) -> list[dict[str, Any]]:
        return self.rows

    def save(self, directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        js = directory / "probe.json"
        js.write_text(json.dumps(self.rows))
        png = directory / "probe.png"
        arr = np.zeros((8, max(len(self.rows), 1), 3), np.uint8)
        arr[..., 1] = 200
        Image.fromarray(arr).save(png)
        return [js, png]


attntrace.register_observer("probe", Probe)


@pytest.fixture(scope="module")
def pipeline_dir(demo_pipeline_dir: Path) -> Path:
    return demo_pipeline_dir


def _exp(pipeline_dir: Path, out: Path, **inputs: Any) -> Experiment:
    return Experiment.from_data(
        {
            "name": "t",
            "model": {"pipeline": "StableDiffusionPipeline", "path": str(pipeline_dir), "device": "cpu"},
            "inputs": {
                "prompts": ["a cat", "a dog on a mat"],
                "seeds": [0],
                "steps": 2,
                "guidance_scale": 5.0,
                "height": 64,
                "width": 64,
                **inputs,
            },
            "trace": {
                "rules": [
                    {"use": "probe", "match": "down_blocks.0.*attn2", "kind": "cross"},
                    {"use": "shapes", "match": "*"},
                ]
            },
            "output": str(out),
        }
    )


# -- spec ----------------------------------------------------------------------------------------
GOOD = """
name: cat-heatmaps
model: {pipeline: StableDiffusionPipeline, path: ./checkpoints/sd15, dtype: float16, device: auto}
inputs: {prompts: ["a cat sitting on a mat"], seeds: [0, 1, 2], steps: 30, guidance_scale: 7.5}
trace:
  rules:
    - {use: shapes, match: "*attn2"}
output: runs/{name}
"""


def test_spec_loads_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "exp.yaml"
    f.write_text(GOOD)
    exp = load_experiment(f, ["inputs.steps=10", "inputs.seeds=[4, 5]", "model.dtype=float32"])
    assert exp.inputs.steps == 10 and exp.inputs.seeds == [4, 5] and exp.model.dtype == "float32"
    assert exp.output_dir == Path("runs/cat-heatmaps")
    assert [it.id for it in plan_items(exp)] == ["p000-s4", "p000-s5"]
    assert exp.trace.rules[0].use == "shapes"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("inputs.steps=0", "inputs.steps"),
        ("inputs.stepz=3", "inputs.stepz"),
        ("model.dtype=float64", "model.dtype"),
        ("trace.rules.0.use=nope", "trace.rules.0.use"),
        ("trace.rules.0.with={bogus: 1}", "trace.rules.0.with.bogus"),
        ("name=bad name!", "name"),
        ("inputs.prompts=[]", "inputs.prompts"),
    ],
)
def test_spec_errors_name_the_field(tmp_path: Path, override: str, field: str) -> None:
    f = tmp_path / "exp.yaml"
    f.write_text(GOOD)
    with pytest.raises(ConfigError) as info:
        load_experiment(f, [override])
    assert str(info.value).startswith(f"{field}: "), str(info.value)


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match=r"a\.b=value"):
        apply_overrides({}, ["justakey"])
    assert apply_overrides({"a": [1, 2]}, ["a.1=x"]) == {"a": [1, "x"]}


def test_schema_describes_fields() -> None:
    schema = experiment_schema()
    assert set(schema["required"]) == {"name", "model"}
    assert "inputs" in schema["properties"] and "trace" in schema["properties"]
    json.dumps(schema)


# -- runner --------------------------------------------------------------------------------------
def test_run_resume_force_and_results(pipeline_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    exp = _exp(pipeline_dir, out)
    res = run_experiment(exp, progress=False)
    assert res.ran == ["p000-s0", "p001-s0"] and not res.failed
    man = read_manifest(out / "manifest.json")
    assert man is not None
    assert man["versions"]["torch"] == torch.__version__ and man["config"] == exp.dump()
    for iid, rec in man["items"].items():
        assert rec["status"] == "done", rec
        assert {"image.png", "probe/probe.json", "shapes/shapes.json"} <= {
            f.split("/", 2)[-1] for f in rec["files"]
        }
        for f in rec["files"]:
            assert (out / f).is_file()
        img = np.asarray(Image.open(out / "items" / iid / "image.png"))
        assert img.shape == (64, 64, 3)
        rows = json.loads((out / "items" / iid / "probe" / "probe.json").read_text())
        # 2 steps x CFG-batched forward x 1 site: one row per step, and per item (fresh tracer per item).
        assert [r["step"] for r in rows] == [0, 1]
        assert max(r["err"] for r in rows) < 1e-5 and max(r["probs_vs_ref"] for r in rows) < 1e-6
        assert all(abs(r["rowsum"] - 1) < 1e-5 for r in rows)
        assert rec["tokens"][0] == "<|startoftext|>"
    first_mtime = (out / "items" / "p000-s0" / "image.png").stat().st_mtime_ns

    again = run_experiment(exp, progress=False)
    assert again.ran == [] and again.skipped == ["p000-s0", "p001-s0"]
    assert (out / "items" / "p000-s0" / "image.png").stat().st_mtime_ns == first_mtime

    # Same seed and prompt: a forced redo reproduces the image exactly.
    before = np.asarray(Image.open(out / "items" / "p001-s0" / "image.png"))
    forced = run_experiment(exp, force=True, progress=False)
    assert forced.ran == ["p000-s0", "p001-s0"]
    assert np.array_equal(before, np.asarray(Image.open(out / "items" / "p001-s0" / "image.png")))

    # A different configuration in the same folder is refused without --force.
    with pytest.raises(RunError, match="different experiment"):
        run_experiment(_exp(pipeline_dir, out, steps=3), progress=False)


def test_interrupt_leaves_consistent_manifest(pipeline_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    exp = _exp(pipeline_dir, out)
    Probe.interrupt_on_prompt = "a dog on a mat"
    try:
        with pytest.raises(KeyboardInterrupt):
            run_experiment(exp, progress=False)
    finally:
        Probe.interrupt_on_prompt = None
    man = read_manifest(out / "manifest.json")
    assert man is not None
    assert man["items"]["p000-s0"]["status"] == "done"
    assert man["items"]["p001-s0"]["status"] == "interrupted"
    assert not list(out.glob(".manifest.json.*"))  # no temp file left behind
    res = run_experiment(exp, progress=False)
    assert res.ran == ["p001-s0"] and res.skipped == ["p000-s0"]
    man = read_manifest(out / "manifest.json")
    assert man is not None and all(r["status"] == "done" for r in man["items"].values())


def test_report_lists_every_png(pipeline_dir: Path, tmp_path: Path) -> None:
    import re

    from attntrace.report.html import write_report

    out = tmp_path / "run"
    run_experiment(_exp(pipeline_dir, out, prompts=["a cat"]), progress=False)
    index = write_report(out)
    page = index.read_text()
    data = json.loads(re.search(r'id="attntrace-data">(.*?)</script>', page, re.S).group(1).replace("<\\/", "</"))
    item = data["runs"][0]["items"][0]
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert len(pngs) == 2 and {f["path"] for f in item["files"]} >= set(pngs)  # image + probe plot, listed
    assert len(item["images"]) == 1 and item["images"][0].startswith("data:image/png;base64,")  # embedded
    assert item["prompt"] == "a cat"
    with pytest.raises(RunError, match="no run"):
        write_report(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else tmp_path)
