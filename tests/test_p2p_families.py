"""The prompt-to-prompt recipes where P2P's code cannot go: SDXL (cross-attention, two CLIP encoders), SD3
(joint blocks over CLIP + T5 positions) and Flux (joint and single blocks over T5 positions).

Checked from the definitions on the calls themselves (a recorder after the editors sees the maps before and
after the edit): the source and unconditional rows are untouched, text-query rows of joint blocks are
untouched, every edited row still sums to one, an unswapped word's columns equal the source's, and a
swapped word's columns equal the source word's; end to end, the source image is the unedited one."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from attntrace import AttentionCall, Observer, Tracer
from attntrace.core.words import generation_positions
from tests import tiny_pipes

PROMPTS = ["a cat on the grass", "a dog on the grass"]
KW: dict[str, dict[str, Any]] = {
    "sdxl": {"height": 32, "width": 32},
    "sd3": {"height": 32, "width": 32, "max_sequence_length": 16},
    "flux": {"height": 32, "width": 32, "max_sequence_length": 16},
}


class After(Observer):
    """Records, for one call per kind inside the window, the maps before and after the editors."""

    needs = frozenset({"probs"})

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, tuple[AttentionCall, torch.Tensor, torch.Tensor]] = {}
        self.generation: Any = None

    def on_generation_start(self, generation: Any) -> None:
        self.generation = generation

    def on_call(self, call: AttentionCall) -> None:
        before = call.extra.get("p2p_probs")
        if before is not None and call.step == 0 and call.kind not in self.seen and call.text_tokens is not None:
            self.seen[call.kind] = (call, before.clone(), call.probs.clone())


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_word_swap_on_family(family: str) -> None:
    pipe = getattr(tiny_pipes, family)()
    # The latent side as the pipeline derives it from `height` (tiny VAEs downsample less than 8x).
    scale = pipe.vae_scale_factor
    side = 2 * (KW[family]["height"] // (scale * 2)) if family == "flux" else KW[family]["height"] // scale
    ch = pipe.vae.config.latent_channels
    latent = torch.randn((1, ch, side, side), generator=torch.Generator().manual_seed(0))
    if family == "flux":  # Flux packs 2x2 latent patches into tokens
        latent = pipe._pack_latents(latent, 1, ch, side, side)

    def run(rules: list[dict[str, Any]], rec: Observer | None = None) -> torch.Tensor:
        tracer = Tracer({"rules": rules})
        if rec is not None:
            tracer.add(rec)
        with tracer.attach(pipe):
            return pipe(PROMPTS, latents=latent.expand(2, *latent.shape[1:]), num_inference_steps=3,
                        output_type="latent", **KW[family]).images  # fmt: skip

    rules = [{"use": "replace", "with": {"cross_replace_steps": 0.8, "self_replace_steps": 0.4,
                                         "self_max_queries": None}}]  # fmt: skip
    rec = After()
    edited = run(rules, rec)
    plain = run([])
    # The source image is untouched up to round-off (its edited calls run as probs @ v, not the fused
    # kernel); the edited image moves far more.
    source_moved = (edited[0] - plain[0]).abs().max().item()
    assert source_moved < 2e-3 and (edited[1] - plain[1]).abs().max().item() > 10 * max(source_moved, 1e-4)
    gen = rec.generation
    assert gen.group == (0, 1)
    kind = "cross" if family == "sdxl" else "joint"
    call, before, after = rec.seen[kind]
    batch = before.shape[0]
    cond = gen.cond_rows(batch)
    src, ed = cond.start, cond.start + 1
    for row in range(batch):
        if row != ed:
            assert torch.equal(before[row], after[row])  # source and unconditional rows untouched
    text = call.text_tokens
    q = slice(None) if kind == "cross" else call.image_tokens
    if kind == "joint":
        assert torch.equal(before[ed][:, text], after[ed][:, text])  # text-query rows untouched
    torch.testing.assert_close(after[ed].sum(-1), torch.ones_like(after[ed].sum(-1)), atol=1e-5, rtol=0)
    n_text = text.stop - text.start
    (grass_src,) = generation_positions(gen, 0, ["grass"], n_text=n_text)
    (grass_dst,) = generation_positions(gen, 1, ["grass"], n_text=n_text)
    (cat,) = generation_positions(gen, 0, ["cat"], n_text=n_text)
    (dog,) = generation_positions(gen, 1, ["dog"], n_text=n_text)
    block_src = before[src][:, q, text]
    block_new = after[ed][:, q, text]
    # (joint: the text block is the mapped one; only the image-key part of the row was rescaled)
    torch.testing.assert_close(block_new[..., grass_dst], block_src[..., grass_src], atol=1e-6, rtol=0)
    if len(cat) == len(dog):
        torch.testing.assert_close(block_new[..., dog], block_src[..., cat], atol=1e-6, rtol=0)


def test_local_blend_on_flux_packed_latents() -> None:
    pipe = tiny_pipes.flux()
    tracer = Tracer()
    tracer.add("replace", cross_replace_steps=0.8, self_replace_steps=0.4)
    tracer.add("local_blend", words=["cat", "dog"], start_blend=0.0)
    with tracer.attach(pipe):
        out = pipe(PROMPTS, num_inference_steps=2, output_type="latent", **KW["flux"]).images
    assert out.shape[0] == 2 and torch.isfinite(out).all()
