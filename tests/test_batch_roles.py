"""Each call's layout labels its batch rows `cond` / `uncond`, from the generation (the pipeline call).

Checked on a real tiny `StableDiffusionPipeline`: with guidance > 1 the pipeline concatenates
`[negative_prompt_embeds, prompt_embeds]`; at every cross-attention call the key rows labelled `cond`
must be the site's own key projection of the pipeline's `encode_prompt` prompt embeddings (image by
image, in order), and the `uncond` rows that of its negative embeddings. Observers that keep the
conditional rows (`cond_half`) take the labelled rows, not "the second half".
"""

from __future__ import annotations

import pytest
import torch

from attntrace import Tracer
from tests.layout_probe import KeyRecorder
from tests.sd_pipes import latents, sd15

pytest.importorskip("diffusers")

PROMPTS = ["a red cat", "a blue dog on grass"]
NEGATIVE = ["blurry", "dark photo"]


def _heads(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    k = module.to_k(x)  # (B, L, C) -> (B, H, L, C/H), as the kernel sees it
    return k.unflatten(-1, (module.heads, -1)).transpose(1, 2)


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_cond_rows_are_the_prompt_embeddings_the_pipeline_encoded(guidance: float) -> None:
    torch.set_num_threads(1)
    pipe = sd15()
    tracer = Tracer()
    rec = tracer.add(KeyRecorder(), match="*attn2", steps=[0])
    with tracer.attach(pipe), torch.no_grad():
        pipe(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=1, guidance_scale=guidance,
             latents=latents(pipe, len(PROMPTS)), output_type="latent")  # fmt: skip
        cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True, NEGATIVE)
    modules = dict(pipe.unet.named_modules())
    assert rec.calls
    for site, _, _, key, layout in rec.calls:
        roles = layout.batch
        n = len(PROMPTS)
        if guidance > 1:
            assert roles == ("uncond",) * n + ("cond",) * n, (site, roles)
        else:
            assert roles == ("cond",) * n, (site, roles)
        with torch.no_grad():
            expected = {"cond": _heads(modules[site], cond), "uncond": _heads(modules[site], uncond)}
        for row, role in enumerate(roles):
            image = sum(1 for r in roles[:row] if r == role)  # the row's image among the rows of its role
            torch.testing.assert_close(key[row], expected[role][image], msg=f"{site} row {row} ({role})")


def test_cond_half_keeps_the_rows_labelled_cond() -> None:
    # A bare UNet marked as one generation without guidance: every row is conditional, so `cond_half` keeps them
    # all (a batch of 2 is no [uncond, cond] pair here); with `cfg=True` it keeps the labelled second half.
    torch.set_num_threads(1)
    unet = sd15().unet
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    for cfg, kept in ((False, {0, 1}), (True, {1})):
        rows = len(kept)
        tracer = Tracer()
        stats = tracer.add("stats", match="*attn2", cond_half=True)
        heat = tracer.add("heatmap", match="*attn2", cond_half=True, resolution=8)
        with tracer.attach(unet), tracer.generation(PROMPTS[:rows], cfg=cfg), torch.no_grad():
            unet(x, 10, encoder_hidden_states=ctx)
        assert heat.result()["maps"].shape[0] == rows, cfg
        assert {r["batch"] for r in stats.result()} == kept, cfg
