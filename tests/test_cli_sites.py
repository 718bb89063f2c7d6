"""`attntrace sites` says why attention cannot be traced, naming the model class (in-process CLI calls)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from attntrace.cli import main
from tests.coverage_models import sana


def _sites(folder: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert main(["sites", str(folder)]) == 0
    return capsys.readouterr().out.splitlines()


def test_linear_sites_are_explained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = sana()
    model.save_pretrained(tmp_path / "sana")
    out = _sites(tmp_path / "sana", capsys)
    header = out[0].split()
    assert header[-1] == "note"
    linear = [ln for ln in out[2:-2] if " linear " in ln]
    assert len(linear) == 2 and all(ln.endswith("linear attention: no probability matrix") for ln in linear)
    assert out[-2] == "4 site(s)"
    assert out[-1].startswith("SanaTransformer2DModel: 2 site(s) (Attention with SanaLinearAttnProcessor2_0)")
    assert "refused at attach" in out[-1]


def test_model_without_traceable_attention_is_explained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from diffusers import T2IAdapter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        T2IAdapter(channels=[8, 16], num_res_blocks=1, downscale_factor=4).save_pretrained(tmp_path / "t2i")
    out = _sites(tmp_path / "t2i", capsys)
    assert out[-2] == "0 site(s)"
    assert out[-1].startswith("T2IAdapter: no attention attntrace can trace: no diffusers attention module")


def test_hand_written_diffusers_attention_is_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """UNet1DModel's SelfAttention1d computes softmax(QK^T)V inline: the torch-manual adapter lists it."""
    from diffusers import UNet1DModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        UNet1DModel(block_out_channels=(32, 32, 64), in_channels=2, out_channels=2, extra_in_channels=16,
                    down_block_types=("DownBlock1DNoSkip", "DownBlock1D", "AttnDownBlock1D"),
                    up_block_types=("AttnUpBlock1D", "UpBlock1D", "UpBlock1DNoSkip"),
                    mid_block_type="UNetMidBlock1D", out_block_type=None).save_pretrained(tmp_path / "u1")  # fmt: skip
    out = _sites(tmp_path / "u1", capsys)
    rows = [ln for ln in out if "SelfAttention1d" in ln]
    # 3 in AttnDownBlock1D, 6 in UNetMidBlock1D, 3 in AttnUpBlock1D.
    assert len(rows) == 12 and all("softmax (hand-written)" in ln and " self " in ln for ln in rows)
    assert "12 site(s)" in out
