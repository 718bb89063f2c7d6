"""`reweight` and `replace` on joint and single-stream blocks (Flux), through the call's layout."""

from __future__ import annotations

from typing import Any

import torch

from attntrace import Observer, Tracer
from tests.coverage_models import CASES


class _Probs(Observer):
    needs = frozenset({"probs"})

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, torch.Tensor, Any]] = []

    def on_call(self, call: Any) -> None:
        self.seen.append((call.site, call.probs.detach().clone(), call.layout))


def _flux_batch2() -> tuple[torch.nn.Module, dict[str, Any]]:
    torch.manual_seed(0)
    model, inputs = CASES["FluxTransformer2DModel"]()
    out = {}
    for k, v in inputs.items():
        out[k] = torch.cat([v, v + 0.5 * torch.randn_like(v)]) if isinstance(v, torch.Tensor) and k in (
            "hidden_states", "encoder_hidden_states", "pooled_projections", "timestep") else v  # fmt: skip
    return model, out


def test_reweight_scales_text_columns_of_image_rows_in_single_stream_blocks() -> None:
    model, inputs = _flux_batch2()
    tracer = Tracer()
    before = tracer.add(_Probs(), kind="joint")
    tracer.add("reweight", kind="joint", tokens=[1, 3], factor=2.5)
    after = tracer.add(_Probs(), kind="joint")
    with tracer.attach(model), torch.no_grad():
        edited = model(**inputs).sample
    with torch.no_grad():
        plain = model(**inputs).sample
    assert not torch.equal(edited, plain)
    sites = {site for site, _, _ in after.seen}
    assert any(s.startswith("single_transformer_blocks") for s in sites)
    for (site, p0, lay), (_, p1, _) in zip(before.seen, after.seen):
        expected = p0.clone()
        cols = [lay.text.start + 1, lay.text.start + 3]
        block = p0[:, :, lay.image].clone()
        block[..., cols] *= 2.5
        expected[:, :, lay.image] = block
        torch.testing.assert_close(p1, expected, msg=site)


def test_replace_injects_the_source_text_block_in_joint_and_single_stream_blocks() -> None:
    model, inputs = _flux_batch2()
    tracer = Tracer()
    before = tracer.add(_Probs(), kind="joint")
    tracer.add("replace", kind="joint", source=0, num_steps=1, cfg=False)  # a bare model: no pipeline to say so
    after = tracer.add(_Probs(), kind="joint")
    with tracer.attach(model), torch.no_grad():
        model(**inputs)
    assert any(s.startswith("single_transformer_blocks") for s, _, _ in after.seen)
    for (site, p0, lay), (_, p1, _) in zip(before.seen, after.seen):
        img, txt = lay.image, lay.text
        # The edited item's image rows attend to the text exactly as the source item does ...
        torch.testing.assert_close(p1[1, :, img][..., txt], p0[0, :, img][..., txt], msg=site)
        # ... its rows still sum to one, its image-key attention keeps its own proportions ...
        torch.testing.assert_close(p1[1].sum(-1), torch.ones_like(p1[1].sum(-1)), msg=site)
        own, new = p0[1, :, img][..., img.start :], p1[1, :, img][..., img.start :]
        ratio = new / own.clamp_min(1e-30)
        torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio), atol=1e-4, rtol=1e-4, msg=site)
        # ... and the source item and the text rows are untouched.
        torch.testing.assert_close(p1[0], p0[0], msg=site)
        torch.testing.assert_close(p1[1, :, txt], p0[1, :, txt], msg=site)
