"""Notebook use: stats results display inline, the stats plot keeps a legend for every line, and
diffusers' own progress bar keeps working in `pipe()` under attach and after the runner used the pipeline."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from attntrace import Tracer
from attntrace.observers.attnmaps import site_group
from attntrace.observers.stats import COLUMNS, StatsTable, plot_rows
from tests.tiny import FAMILIES, run


def _rows(n_sites: int, steps: int) -> list[tuple[object, ...]]:
    blocks = ["down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0"]
    out = []
    for i in range(n_sites):
        site = f"{blocks[i % 4]}.attentions.{i}.transformer_blocks.0.attn2"
        for s in range(steps):
            for metric in ("entropy", "max"):
                out.append((site, 0, s, None, "cross", 0, 0, metric, float(i + s)))
    return out


def test_stats_result_displays_inline() -> None:
    model, inputs = FAMILIES["sd15"]()
    tracer = Tracer({"rules": [{"use": "stats", "match": "*attn2"}]})
    with tracer.attach(model):
        run(model, inputs)
    table = tracer.results()["stats"]
    assert isinstance(table, StatsTable) and isinstance(table[0], dict)
    png = table._repr_png_()
    img = Image.open(io.BytesIO(png))
    assert img.size[0] > 300 and img.size[1] > 300
    html = table._repr_html_()
    sites = len({r["site"] for r in table})
    assert f"{len(table)} rows, {sites} site(s), steps 0..0" in html
    embedded = html.split("base64,", 1)[1].split("'", 1)[0]
    assert base64.b64decode(embedded) == png
    assert tracer.observers["stats"]._repr_png_() == png  # the observer itself displays the same


def test_stats_plot_keeps_a_legend_past_12_lines() -> None:
    rows = _rows(20, 3)
    fig = plot_rows(rows, ["entropy", "max"])
    legend = fig.axes[0].get_legend()
    blocks = {site_group(str(r[0])) for r in rows}
    assert legend is not None and sorted(t.get_text() for t in legend.get_texts()) == sorted(blocks)
    few = plot_rows(_rows(5, 3), ["entropy"])
    assert len(few.axes[0].get_legend().get_texts()) == 5  # one per site up to 12


def test_one_forward_stats_are_bars_over_layers() -> None:
    fig = plot_rows(_rows(6, 1), ["entropy"])
    ax = fig.axes[0]
    assert len(ax.patches) == 6 and not ax.lines and ax.get_xlabel().startswith("layer")
    assert StatsTable(dict(zip(COLUMNS, r)) for r in _rows(6, 1)).plot().axes[0].patches


@pytest.fixture(scope="module")
def pipe(demo_pipeline_dir: Path) -> object:
    pytest.importorskip("diffusers")
    import torch
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(demo_pipeline_dir, torch_dtype=torch.float32)


def _bar_shown(pipe: object, capsys: pytest.CaptureFixture[str]) -> bool:
    capsys.readouterr()
    pipe("a cat", num_inference_steps=2, height=64, width=64, guidance_scale=5.0)  # type: ignore[operator]
    return "2/2" in capsys.readouterr().err


def test_diffusers_progress_bar_under_attach(pipe: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from attntrace.experiment.runner import run_experiment
    from attntrace.experiment.spec import Experiment

    tracer = Tracer({"rules": [{"use": "stats", "match": "*attn2"}]})
    with tracer.attach(pipe):
        assert _bar_shown(pipe, capsys)
    exp = Experiment.from_data({
        "name": "nb", "model": {"pipeline": "StableDiffusionPipeline", "path": "attntrace:demo"},
        "inputs": {"prompts": ["a cat"], "steps": 2, "height": 64, "width": 64},
        "trace": {"rules": [{"use": "shapes"}]}, "output": str(tmp_path / "run"),
    })  # fmt: skip
    run_experiment(exp, progress=False, model=(pipe, None))  # the runner shows its own bar meanwhile
    with tracer.attach(pipe):
        assert _bar_shown(pipe, capsys)  # ... and gives the pipeline its bar back
