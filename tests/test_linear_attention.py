"""Linear attention (Sana): sites of kind `linear`, probs refused at attach, q/k/v/output observable."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from attntrace import Observer, Tracer
from attntrace.core.call import AttentionCall
from attntrace.core.errors import AttachError, ConfigError, EditError, SelectionError
from tests.coverage_models import run, sana


class Probs(Observer):
    needs = frozenset({"probs"})


class QKVO(Observer):
    """Keeps q/k/v/output per site (tiny model only)."""

    needs = frozenset({"query", "key", "value", "output"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, dict[str, Any]] = {}

    def on_call(self, call: AttentionCall) -> None:
        self.calls[call.site] = {"q": call.query, "k": call.key, "v": call.value, "out": call.output,
                                 "kind": call.kind, "call": call}  # fmt: skip


def _linear_sites(model: torch.nn.Module) -> list[str]:
    return [s.name for s in Tracer().sites(model) if s.kind == "linear"]


def test_sana_sites_are_linear() -> None:
    model, _ = sana()
    sites = Tracer().sites(model)
    linear = [s for s in sites if s.kind == "linear"]
    assert linear and all(s.name.endswith("attn1") for s in linear)
    assert all(not s.probs and not s.editable for s in linear)
    assert all(s.processor_class == "SanaLinearAttnProcessor2_0" for s in linear)
    assert {s.kind for s in sites if s.name.endswith("attn2")} == {"cross"}


def test_probs_observer_refused_naming_sites() -> None:
    model, _ = sana()
    tracer = Tracer()
    tracer.add(Probs(), match="*")
    with pytest.raises((AttachError, SelectionError, ConfigError)) as info:
        tracer.attach(model)
    for name in _linear_sites(model)[:1]:
        assert name in str(info.value)
    assert "linear" in str(info.value)
    # Nothing stayed patched.
    assert all(type(s.module.processor).__name__.startswith("Sana") for s in Tracer().sites(model))


def test_probs_observer_on_softmax_sites_only_is_fine() -> None:
    model, inputs = sana()
    tracer = Tracer()
    tracer.add(Probs(), kind=["self", "cross", "joint"])
    with tracer.attach(model):
        run(model, inputs)


def test_qkv_output_at_linear_sites() -> None:
    model, inputs = sana()
    expected = run(model, inputs)
    # Independent capture of the projections with our own hooks.
    ref: dict[str, torch.Tensor] = {}
    attn = model.transformer_blocks[0].attn1
    hooks = [attn.to_q.register_forward_hook(lambda m, a, o: ref.setdefault("q", o)),
             attn.to_out[0].register_forward_pre_hook(lambda m, a: ref.setdefault("out", a[0]))]  # fmt: skip
    tracer = Tracer()
    obs = tracer.add(QKVO(), kind="linear")
    with tracer.attach(model):
        got = run(model, inputs)
    for h in hooks:
        h.remove()
    assert torch.equal(got, expected)
    assert set(obs.calls) == set(_linear_sites(model))
    c = obs.calls["transformer_blocks.0.attn1"]
    heads = attn.heads
    b, L, C = ref["q"].shape
    assert c["kind"] == "linear" and c["q"].shape == (b, heads, L, C // heads)
    assert torch.equal(c["q"], ref["q"].unflatten(-1, (heads, -1)).transpose(1, 2))
    assert torch.equal(c["out"], ref["out"].unflatten(-1, (heads, -1)).transpose(1, 2))
    # The linear-attention output really is relu(q)·(relu(k)ᵀ v) normalised: check against the projections.
    q, k, v = (torch.relu(c["q"]), torch.relu(c["k"]), c["v"])
    num = q @ (k.transpose(-1, -2) @ v)
    den = q @ k.sum(-2, keepdim=True).transpose(-1, -2)
    torch.testing.assert_close(num / (den + 1e-15), c["out"], atol=1e-5, rtol=1e-4)
    with pytest.raises(EditError, match="linear"):
        _ = c["call"].probs
