"""The training script end to end at a toy budget: it writes a loadable pipeline and its record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_train_script_writes_loadable_pipeline_with_options(tmp_path: Path) -> None:
    from attntrace.toyworld.model import load_pipeline
    from attntrace.toyworld.train import main

    out = tmp_path / "toy"
    args = ["--out", str(out), "--threads", "1", "--steps", "3", "--vae-steps", "2", "--pool", "32"]
    args += ["--batch", "4", "--eval-prompts", "2"]
    args += ["--set", "prediction_type=v_prediction", "--set", "decoder_noise=0.5"]
    args += ["--set", "uncond_attention_loss=0.5", "--set", "caption_dropout=0.5", "--set", "unet_heads=2"]
    assert main(args) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["settings"]["prediction_type"] == "v_prediction"
    assert record["settings"]["uncond_attention_loss"] == 0.5
    assert 0.0 <= record["prompt_following"]["rate"] <= 1.0 and record["prompt_following"]["n"] == 2
    pipe = load_pipeline(out)
    assert pipe.scheduler.config.prediction_type == "v_prediction"  # what the UNet was trained to predict
    assert {m.heads for n, m in pipe.unet.named_modules() if n.endswith(("attn1", "attn2"))} == {2}
    assert pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer("a red circle").input_ids)[1:4] == [
        "a</w>",
        "red</w>",
        "circle</w>",
    ]


def test_train_script_rejects_unknown_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from attntrace.toyworld.train import main

    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "x"), "--set", "no_such_setting=1"])
    assert exc.value.code == 2
    assert "unknown setting 'no_such_setting'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
