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
    args += ["--set", "min_snr=0", "--set", "unet_channels=16,16,16", "--set", "uncond_layers=each"]
    assert main(args) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["settings"]["prediction_type"] == "v_prediction"
    assert record["settings"]["uncond_attention_loss"] == 0.5 and record["settings"]["min_snr"] == 0
    assert 0.0 <= record["prompt_following"]["rate"] <= 1.0 and record["prompt_following"]["n"] == 2
    pipe = load_pipeline(out)
    assert pipe.scheduler.config.prediction_type == "v_prediction"  # what the UNet was trained to predict
    assert {m.heads for n, m in pipe.unet.named_modules() if n.endswith(("attn1", "attn2"))} == {2}
    assert [b.resnets[0].out_channels for b in pipe.unet.down_blocks] == [16, 16, 16]  # a level per count
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

    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "x"), "--set", "attention_layers=every"])
    assert exc.value.code == 2
    assert "attention_layers='every': use one of full, each" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_joint_train_script_writes_loadable_sd3_pipeline(tmp_path: Path) -> None:
    import torch

    from attntrace.toyworld.model import call_kwargs, load_joint_pipeline
    from attntrace.toyworld.train_joint import main

    out = tmp_path / "joint"
    args = ["--out", str(out), "--set", "steps=3", "--set", "pool=32", "--set", "batch=4", "--set", "eval_prompts=2"]
    assert main([*args, "--set", "caption_dropout=0.5"]) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["settings"]["steps"] == 3 and record["prompt_following"]["n"] == 2
    assert record["call"] == {"max_sequence_length": 0}
    pipe = load_joint_pipeline(out)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.text_encoder_3 is None
    assert call_kwargs(pipe) == {"max_sequence_length": 0}
    # the latents' statistics went to the VAE config, where SD3's pipeline reads them
    assert pipe.vae.config.shift_factor == pytest.approx(record["latent_shift_factor"])
    images = pipe(["a red circle"], num_inference_steps=2, output_type="np", **call_kwargs(pipe)).images
    assert images.shape == (1, 32, 32, 3) and bool(torch.isfinite(torch.from_numpy(images)).all())


def test_joint_training_processor_matches_diffusers_and_keeps_the_definition_probs(tmp_path: Path) -> None:
    """The training-time processor computes SD3's joint attention exactly as diffusers' does, and the
    image x text probabilities it keeps are softmax(q k^T / sqrt(d)) over image and text keys together."""
    import torch
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from attntrace.toyworld.train import write_tokenizer
    from attntrace.toyworld.train_joint import JointSettings, KeepJointProbs, build_models

    torch.manual_seed(0)
    tok = write_tokenizer(tmp_path / "tok")
    _, _, transformer = build_models(tok, JointSettings(layers=2))
    img, txt = torch.randn(2, 64, 64), torch.randn(2, 16, 64)
    for block in transformer.transformer_blocks:  # the last block is context_pre_only
        attn = block.attn
        ref = JointAttnProcessor2_0()(attn, img, txt)
        store: list[torch.Tensor] = []
        got = KeepJointProbs(store)(attn, img, txt)
        for r, g in zip(ref, got):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
        q = torch.cat([attn.to_q(img), attn.add_q_proj(txt)], 1).view(2, 80, attn.heads, -1).transpose(1, 2)
        k = torch.cat([attn.to_k(img), attn.add_k_proj(txt)], 1).view(2, 80, attn.heads, -1).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
        torch.testing.assert_close(store[0], probs[:, :, :64, 64:].mean(1), atol=1e-6, rtol=1e-5)


def test_flat_map_loss_reads_each_layer_when_asked() -> None:
    """Two layers whose dropped-caption maps peak in opposite places average to a flat map: the "full"
    flat-map term (on the mean) is 0, the "each" term is the mean of the layers' own distances from flat."""
    from types import SimpleNamespace

    import torch

    from attntrace.toyworld.train import attention_losses

    pixels, tokens = 4, 3
    a = torch.full((1, pixels, tokens), 1 / tokens)
    b = a.clone()
    a[0, 0, 1], a[0, 1, 1] = 2 / tokens, 0.0  # token 1: all of pixel 1's share moved to pixel 0
    b[0, 0, 1], b[0, 1, 1] = 0.0, 2 / tokens  # and the other way
    mean = (a + b) / 2
    pos = torch.full((1, 3, 2), -1, dtype=torch.long)
    masks, drop = torch.zeros(1, 3, pixels), torch.tensor([True])
    s = SimpleNamespace(attention_loss=1.0, coverage_loss=0.0, uncond_attention_loss=1.0)
    _, full = attention_losses(mean, pos, masks, drop, s)
    _, each = attention_losses(mean, pos, masks, drop, s, [a, b])
    assert full[-1].item() == pytest.approx(0.0, abs=1e-5)
    # by hand: token 1's map normalised over pixels is (1/2, 0, 1/4, 1/4); times 4 pixels minus 1 -> (1, -1, 0, 0)
    expected = (1 + 1) / (pixels * tokens)
    assert each[-1].item() == pytest.approx(expected, rel=1e-4)


def test_attention_loss_reads_every_layer_on_its_own_grid() -> None:
    """attention_layers=each: a 16x16 layer whose object-word maps lie wholly outside the object scores 1,
    an 8x8 layer whose maps lie wholly inside the mask pooled to 8x8 scores 0; the loss is their mean."""
    from types import SimpleNamespace

    import torch

    from attntrace.toyworld.train import per_layer_attention_losses

    mask = torch.zeros(16, 16)
    mask[:8, :8] = 1.0  # the object: the top-left quadrant
    masks = torch.zeros(1, 3, 256)
    masks[0, 0] = mask.flatten()
    pos = torch.full((1, 3, 2), -1, dtype=torch.long)
    pos[0, 0] = torch.tensor([1, 2])  # colour and shape tokens
    fine = torch.zeros(1, 256, 3)
    fine[0, :, 0] = 1.0
    fine[0, 255, :] = torch.tensor([0.0, 0.5, 0.5])  # tokens 1, 2: only the bottom-right pixel (outside)
    coarse = torch.zeros(1, 64, 3)
    coarse[0, :, 0] = 1.0
    coarse[0, 0, :] = torch.tensor([0.0, 0.5, 0.5])  # only the top-left 8x8 pixel (inside)
    s = SimpleNamespace(attention_loss=1.0, coverage_loss=0.0, uncond_attention_loss=0.0)
    attn, terms = per_layer_attention_losses([fine, coarse], pos, masks, torch.tensor([False]), s)
    assert attn.item() == pytest.approx(0.5, abs=1e-4) and terms[0].item() == pytest.approx(0.5, abs=1e-4)
    alone, _ = per_layer_attention_losses([coarse], pos, masks, torch.tensor([False]), s)
    assert alone.item() == pytest.approx(0.0, abs=1e-4)
