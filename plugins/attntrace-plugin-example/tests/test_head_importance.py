"""Tests of the example plugin against an independent recomputation from the layer's own weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from attntrace_plugin_example import HeadImportance

from attntrace import ConfigError, TraceConfig, Tracer, registry


def tiny_unet() -> tuple[torch.nn.Module, dict]:
    """A tiny SD1.5-like UNet, random weights (a copy: the plugin does not import attntrace's tests)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    m = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        sample_size=16, norm_num_groups=8,
    ).eval()  # fmt: skip
    return m, {"sample": torch.randn(2, 4, 16, 16), "timestep": torch.tensor(10),
               "encoder_hidden_states": torch.randn(2, 7, 32)}  # fmt: skip


SITE = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


def reference(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Concentration and output norm per head at SITE, from the module's own projections."""
    attn = model.get_submodule(SITE)
    seen = {}

    def grab(mod, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        seen["e"] = kwargs.get("encoder_hidden_states")

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    h, e = seen["h"], seen["e"]
    with torch.no_grad():
        b, heads = h.shape[0], attn.heads
        q = attn.to_q(h).view(b, -1, heads, attn.to_q.out_features // heads).transpose(1, 2)
        k = attn.to_k(e).view(b, -1, heads, attn.to_k.out_features // heads).transpose(1, 2)
        v = attn.to_v(e).view(b, -1, heads, attn.to_v.out_features // heads).transpose(1, 2)
        p = ((q.double() @ k.double().transpose(-1, -2)) * attn.scale).softmax(-1)
        ent = -(p * p.log()).sum(-1)
        conc = (1 - ent / math.log(k.shape[-2])).mean(dim=(0, 2))
        norm = (p @ v.double()).norm(dim=-1).mean(dim=(0, 2))
    return conc, norm


@pytest.fixture(scope="module")
def model():
    return tiny_unet()


def test_registered_through_the_entry_point() -> None:
    registry.refresh()
    assert registry.get("head_importance") is HeadImportance
    assert registry.get("attntrace-plugin-example:head_importance") is HeadImportance


@pytest.mark.parametrize("metric", ["concentration", "output_norm"])
def test_scores_match_reference(model, metric: str, tmp_path: Path) -> None:
    unet, inputs = model
    with torch.no_grad():
        baseline = unet(**inputs).sample
    cfg = TraceConfig.from_yaml(
        "rules:\n  - use: head_importance\n    match: '*attn2'\n"
        f"    with: {{metric: {metric}, max_chunk_mib: 0.001}}\n"
    )
    tracer = Tracer(cfg)
    with tracer.attach(unet), torch.no_grad():
        traced = unet(**inputs).sample
        unet(**inputs)  # a second identical step: the mean must not change
    assert torch.equal(traced, baseline)  # a passive observer changes nothing
    scores = tracer.results()["head_importance"]
    assert all(name.endswith("attn2") for name in scores)
    conc, norm = reference(unet, inputs)
    want = conc if metric == "concentration" else norm
    torch.testing.assert_close(torch.tensor(scores[SITE], dtype=torch.float64), want, atol=1e-5, rtol=1e-4)
    files = tracer.save(tmp_path)
    data = json.loads(files[0].read_text())
    assert data["metric"] == metric and data["scores"][SITE] == scores[SITE]
    top = tracer.observers["head_importance"].ranking(3)
    assert len(top) == 3 and top[0][2] >= top[1][2] >= top[2][2]
    tracer.close()
    assert tracer.results()["head_importance"] == {}


def test_bad_params_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"rules\.0\.with\.metric"):
        TraceConfig.from_yaml("rules:\n  - use: head_importance\n    with: {metric: nope}\n")
    with pytest.raises(ConfigError, match=r"unknown parameter"):
        TraceConfig.from_yaml("rules:\n  - use: head_importance\n    with: {metrics: concentration}\n")
