"""Adapters on diffusers models: IP-Adapter (nn.Module processor, two kernel calls), fused QKV, LoRA."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from attntrace import Observer, Tracer
from attntrace.core.call import AttentionCall
from tests import tiny
from tests.test_coverage_diffusers import transparency


class Grab(Observer):
    needs = frozenset({"value", "probs", "output"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int, int, float]] = []

    def on_call(self, call: AttentionCall) -> None:
        err = float((call.probs @ call.value.float() - call.output.float()).abs().max())
        self.calls.append((call.site, call.index, call.key.shape[-2], err))


def ip_adapter_unet() -> tuple[torch.nn.Module, dict[str, Any]]:
    """The tiny SD1.5 UNet with an IP-Adapter (image projection + IPAdapterAttnProcessor2_0 on attn2)."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    model, inputs = tiny.sd15_unet()
    torch.manual_seed(1)
    procs: dict[str, Any] = {}
    for name in model.attn_processors:
        module = model.get_submodule(name.removesuffix(".processor"))
        if name.endswith("attn2.processor"):
            inner = module.to_k.out_features
            procs[name] = IPAdapterAttnProcessor2_0(inner, cross_attention_dim=32, num_tokens=(4,))
        else:
            procs[name] = AttnProcessor2_0()
    model.set_attn_processor(procs)
    model.encoder_hid_proj = MultiIPAdapterImageProjection(
        [ImageProjection(image_embed_dim=16, cross_attention_dim=32, num_image_text_embeds=4)]
    )
    model.register_to_config(encoder_hid_dim_type="ip_image_proj")
    inputs = dict(inputs, added_cond_kwargs={"image_embeds": [torch.randn(2, 1, 16)]})
    return model.eval(), inputs


def test_ip_adapter_two_kernel_calls_and_weights_visible() -> None:
    model, inputs = ip_adapter_unet()
    expected = tiny.run(model, inputs)
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    ip_sites = [n.removesuffix(".processor") for n in model.attn_processors if n.endswith("attn2.processor")]
    tracer = Tracer()
    grab = tracer.add(Grab())
    with tracer.attach(model):
        # The IP weights stay visible: same state_dict keys, same parameter objects, and .to() reaches them.
        assert list(model.state_dict()) == keys
        assert [id(p) for p in model.parameters()] == params
        assert any(".processor.to_k_ip." in k for k in keys)
        model.to(torch.float64)
        proc = model.get_submodule(ip_sites[0]).processor
        assert proc.to_k_ip[0].weight.dtype == torch.float64
        model.to(torch.float32)
        got = tiny.run(model, inputs)
    assert torch.equal(got, expected)
    for site in ip_sites:
        calls = [(i, lk) for s, i, lk, _ in grab.calls if s == site]
        assert calls == [(0, 7), (1, 4)], calls  # text tokens, then the 4 image tokens
    assert max(e for *_, e in grab.calls) < 1e-5


def fused_qkv_unet() -> tuple[torch.nn.Module, dict[str, Any]]:
    model, inputs = tiny.sd15_unet()
    model.fuse_qkv_projections()
    return model, inputs


def fused_qkv_flux() -> tuple[torch.nn.Module, dict[str, Any]]:
    model, inputs = tiny.flux()
    model.fuse_qkv_projections()
    return model, inputs


@pytest.mark.parametrize("builder", [fused_qkv_unet, fused_qkv_flux, ip_adapter_unet])
def test_transparent_with_adapters(builder: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        record = transparency(builder.__name__, builder)
    if builder is fused_qkv_unet:
        assert record["processors"] == ["FusedAttnProcessor2_0"]


def test_lora_wrapped_projections() -> None:
    peft = pytest.importorskip("peft")
    model, inputs = tiny.sd15_unet()
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                      init_lora_weights=False))  # fmt: skip
    transparency("lora", lambda: (model, inputs))
