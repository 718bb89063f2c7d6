"""Gemma 3n audio's chunked local attention, traced read-only in the block-local layout.

Oracles: the module's own output rebuilt from the traced probs and its value projection through the
layout's index formula (column j of query i is frame (i // chunk - 1)·chunk + j), causality and the
sequence bounds from the definition, and the untraced model (bit-identical outputs).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from attntrace import Observer, Tracer, find_sites
from attntrace.core.call import AttentionCall
from attntrace.core.errors import SelectionError
from tests import coverage_transformers as ct

SITE = "conformer.0.attention.attn"


class Keep(Observer):
    needs = frozenset({"probs", "output"})
    probs_layouts = frozenset({"block_local"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, torch.Tensor, torch.Tensor, Any]] = []

    def on_call(self, call: AttentionCall) -> None:
        self.calls.append((call.site, call.probs.clone(), call.output.clone(), call.layout))


def test_block_context_probs_rebuild_the_output_and_follow_the_layout() -> None:
    torch.set_num_threads(1)
    built = ct.build("gemma3n_audio")
    model, inputs = built.model, built.inputs
    sites = {s.name: s for s in find_sites(model)}
    assert sites[SITE].probs_layout == "block_local" and sites[SITE].traceable
    assert sites[SITE].unavailable == {"query", "key", "value"}
    seen: dict[str, Any] = {}
    att = model.get_submodule(SITE)

    def keep_io(_: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
        seen.setdefault("io", (args[0].clone(), out.clone()))

    hook = att.register_forward_hook(keep_io)
    plain = ct.run(model, inputs)
    hook.remove()
    tracer = Tracer()
    keep = tracer.add(Keep())
    with tracer.attach(model):
        traced = ct.run(model, inputs)
    assert ct.outputs_equal(plain, traced)
    assert not [n for n, m in model.named_modules() if "forward" in vars(m)]
    site, probs, output, layout = next(c for c in keep.calls if c[0] == SITE)
    x, out = seen["io"]
    b, t, h, d = out.shape
    w = att.chunk_size
    assert (layout.probs, layout.window, layout.global_keys) == ("block_local", w, 0)
    assert probs.shape == (b, h, t, att.context_size)
    assert torch.equal(output, out.transpose(1, 2))
    # column j of query i is frame (i // w - 1)·w + j: outside the sequence or in the future, no weight
    i = torch.arange(t)[:, None]
    frame = (i // w - 1) * w + torch.arange(att.context_size)[None, :]
    valid = (frame >= 0) & (frame < t) & (frame <= i)
    assert float(probs[..., ~valid].abs().max()) == 0.0
    # the module's output rebuilt from the probs and its value projection
    with torch.no_grad():
        v = att.v_proj(x).view(b, t, h, d)  # (B, T, H, D)
    gathered = v[:, frame.clamp(0, t - 1)]  # (B, T, context, H, D)
    gathered = gathered * valid[None, :, :, None, None]
    rebuilt = torch.einsum("bhic,bichd->bihd", probs, gathered)
    assert float((rebuilt - out).abs().max()) <= 1e-5


def test_stats_reads_block_context_probs_dense_observers_are_refused() -> None:
    built = ct.build("gemma3n_audio")
    tracer = Tracer()
    tracer.add("heatmap")
    with pytest.raises(SelectionError, match="block_local"):
        tracer.attach(built.model)
    tracer = Tracer()
    keep = tracer.add(Keep(), match=[SITE])
    stats = tracer.add("stats", match=[SITE], metrics=["max"])
    with tracer.attach(built.model):
        ct.run(built.model, built.inputs)
    p = keep.calls[0][1][0]  # batch item 0: (H, T, context)
    rows = [r for r in stats.result() if r["batch"] == 0]
    assert len(rows) == p.shape[0]
    for r in rows:
        assert abs(r["value"] - float(p[r["head"]].amax(-1).mean())) <= 1e-5
