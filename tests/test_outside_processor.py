"""Attention computed outside any processor (F.sdpa inside VAE blocks) is reachable as plain-PyTorch sites.

These diffusers 0.42.1 classes call `F.scaled_dot_product_attention` in a module that holds no
processor, so the diffusers adapter cannot see them: AutoencoderKLWan (WanAttentionBlock),
AutoencoderKLQwenImage (QwenImageAttentionBlock), AutoencoderKLQwenImage21, AutoencoderKLHunyuanImage,
AutoencoderKLHunyuanImageRefiner, AutoencoderKLHunyuanVideo15, AutoencoderVidTok, SanaWM
(SanaWMSoftmaxAttention), and MochiAttentionPool inside Mochi's embeddings. The plain-PyTorch adapter
(`attntrace.adapters.torch`) makes them sites by module name. Every class of
`tests.coverage_models.OUTSIDE_PROCESSOR` also has a case in the transparency test
(tests/test_coverage_diffusers.py), which checks these sites like processor sites.
"""

from __future__ import annotations

import pytest
import torch

from attntrace import Tracer, find_sites


def wan_vae() -> tuple[torch.nn.Module, torch.Tensor]:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    model = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
                             temperal_downsample=[False]).eval()  # fmt: skip
    return model, torch.randn(1, 3, 1, 8, 8)


def qwen_vae() -> tuple[torch.nn.Module, torch.Tensor]:
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    model = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
                                   temperal_downsample=[False]).eval()  # fmt: skip
    return model, torch.randn(1, 3, 1, 8, 8)


def test_diffusers_adapter_does_not_see_them() -> None:
    from attntrace.adapters.diffusers import DiffusersAdapter

    model, _ = wan_vae()
    assert any(type(m).__name__ == "WanAttentionBlock" for m in model.modules())
    assert DiffusersAdapter().find_sites(model) == []


OUTSIDE = [(wan_vae, "WanAttentionBlock"), (qwen_vae, "QwenImageAttentionBlock")]


@pytest.mark.parametrize("builder,block", OUTSIDE)
def test_listed_as_torch_sites(builder: object, block: str) -> None:
    pytest.importorskip("attntrace.adapters.torch")
    model, sample = builder()  # type: ignore[operator]
    blocks = {n for n, m in model.named_modules() if type(m).__name__ == block}
    assert blocks
    sites = {s.name: s for s in find_sites(model)}
    assert blocks <= set(sites), sorted(blocks - set(sites))
    assert all(sites[n].adapter != "diffusers" for n in blocks)
    # And they trace: one call per block, output bit-identical.
    seen: set[str] = set()
    from attntrace import Observer

    class Seen(Observer):
        needs = frozenset({"probs"})

        def on_call(self, call: object) -> None:
            seen.add(call.site)  # type: ignore[attr-defined]

    with torch.no_grad():
        expected = model(sample, return_dict=False)[0]
        tracer = Tracer()
        tracer.add(Seen(), match=sorted(blocks))
        with tracer.attach(model):
            got = model(sample, return_dict=False)[0]
    assert torch.equal(got, expected)
    assert seen == blocks
