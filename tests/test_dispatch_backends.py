"""Every backend of diffusers' `dispatch_attention_fn` is intercepted.

CPU-runnable backends (native, _native_math, flex) run for real; the CUDA-only ones (flash, sage,
xformers) are exercised with a pure-PyTorch stand-in registered in `_AttentionBackendRegistry`
under their names: the tracer must see q/k/v, compute probs equal to the stand-in's own math, and
leave the output bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from attntrace import Observer, Tracer
from attntrace.core.call import AttentionCall
from tests import tiny

dispatch = pytest.importorskip("diffusers.models.attention_dispatch")
Registry = dispatch._AttentionBackendRegistry
Name = dispatch.AttentionBackendName


class Grab(Observer):
    """Keeps every call's q/k/v, probs and output (tiny models only: grows with calls)."""

    needs = frozenset({"query", "key", "value", "probs", "output"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []

    def on_call(self, call: AttentionCall) -> None:
        keep = {"q": call.query, "k": call.key, "v": call.value, "probs": call.probs, "output": call.output}
        self.calls.append({"site": call.site, "extra": dict(call.extra), **keep})


class FluxBlock(torch.nn.Module):
    """One diffusers FluxAttention (dispatcher-based processor) as a tiny model with an optional mask."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers.models.transformers.transformer_flux import FluxAttention

        torch.manual_seed(0)
        self.attn = FluxAttention(query_dim=16, heads=2, dim_head=8)

    def forward(self, x: torch.Tensor, attention_mask: Any = None) -> torch.Tensor:
        return self.attn(x, attention_mask=attention_mask)


@pytest.fixture
def backend() -> Iterator[Any]:
    """Set the active dispatcher backend by name for the test; restore registry and active backend."""
    saved = (dict(Registry._backends), dict(Registry._constraints), dict(Registry._supported_arg_names),
             Registry._active_backend)  # fmt: skip

    def use(name: str) -> None:
        Registry.set_active_backend(Name(name))

    yield use
    Registry._backends.clear()
    Registry._backends.update(saved[0])
    Registry._constraints.clear()
    Registry._constraints.update(saved[1])
    Registry._supported_arg_names.clear()
    Registry._supported_arg_names.update(saved[2])
    Registry.set_active_backend(saved[3])


def _run_traced(model: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, Grab]:
    with torch.no_grad():
        expected = model(*args, **kwargs)
        tracer = Tracer()
        grab = tracer.add(Grab())
        with tracer.attach(model):
            got = model(*args, **kwargs)
    return expected, got, grab


def _reference_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1).float()


@pytest.mark.parametrize("name", ["native", "_native_math", "flex"])
def test_cpu_backends_on_flux(backend: Any, name: str) -> None:
    backend(name)
    model, inputs = tiny.flux()
    with torch.no_grad():
        expected = tiny.run(model, inputs)
        tracer = Tracer()
        grab = tracer.add(Grab())
        with tracer.attach(model):
            got = tiny.run(model, inputs)
    assert torch.equal(got, expected)
    assert {c["site"] for c in grab.calls} == {s.name for s in tracer.sites(model)}
    for c in grab.calls:
        torch.testing.assert_close(c["probs"], _reference_probs(c["q"], c["k"]), atol=1e-5, rtol=0)
        torch.testing.assert_close(c["probs"] @ c["v"], c["output"], atol=1e-5, rtol=0)


def test_flex_block_mask_probs(backend: Any) -> None:
    """A BlockMask passed to the flex backend: probs are built from its mask_mod (here: causal window)."""
    from torch.nn.attention.flex_attention import create_block_mask

    backend("flex")

    def window(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= 3)

    L = 12
    block_mask = create_block_mask(window, 1, 1, L, L, device="cpu")
    model = FluxBlock().eval()
    x = torch.randn(2, L, 16)
    expected, got, grab = _run_traced(model, x, attention_mask=block_mask)
    assert torch.equal(got, expected)
    (call,) = grab.calls
    assert call["extra"]["block_mask"] is block_mask
    qi = torch.arange(L)[:, None]
    dense = (qi >= qi.T) & (qi - qi.T <= 3)
    ref = _reference_probs(call["q"], call["k"], dense)
    torch.testing.assert_close(call["probs"], ref, atol=1e-5, rtol=0)
    assert bool((call["probs"][..., ~dense] == 0).all())
    torch.testing.assert_close(call["probs"] @ call["v"], call["output"], atol=1e-5, rtol=0)


def _stand_in(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
              scale: float | None = None,
              return_lse: bool = False, _parallel_config: Any = None) -> torch.Tensor:  # fmt: skip
    """A pure-PyTorch kernel with the CUDA backends' signature: (B, L, H, D) in and out."""
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    probs = (q @ k.transpose(-1, -2) * scale).softmax(-1)
    return (probs @ v).transpose(1, 2)


@pytest.mark.parametrize("name", ["flash", "sage", "xformers", "_flash_3", "_native_npu"])
def test_stand_in_cuda_backends(backend: Any, name: str) -> None:
    Registry.register(Name(name))(_stand_in)
    backend(name)
    model, inputs = tiny.flux()
    with torch.no_grad():
        expected = tiny.run(model, inputs)
        tracer = Tracer()
        grab = tracer.add(Grab())
        with tracer.attach(model):
            got = tiny.run(model, inputs)
        # The stand-in itself ran (not SDPA): its output equals what the traced model produced.
    assert torch.equal(got, expected)
    assert Registry._backends[Name(name)] is _stand_in, "the registry slot was not restored on detach"
    assert len(grab.calls) == len(tracer.sites(model))
    for c in grab.calls:
        scale = 1.0 / math.sqrt(c["q"].shape[-1])
        ref = (c["q"] @ c["k"].transpose(-1, -2) * scale).softmax(-1)
        torch.testing.assert_close(c["probs"], ref, atol=1e-6, rtol=0)
        out = _stand_in(*(t.transpose(1, 2) for t in (c["q"], c["k"], c["v"]))).transpose(1, 2)
        assert torch.equal(c["output"], out)


def test_stand_in_is_what_runs(backend: Any) -> None:
    """Guard for the test above: with the stand-in active, the kernel called is the stand-in."""
    hits = []

    def counting(**kw: Any) -> torch.Tensor:
        hits.append(1)
        return _stand_in(**kw)

    counting.__signature__ = __import__("inspect").signature(_stand_in)  # type: ignore[attr-defined]
    Registry.register(Name("flash"))(counting)
    backend("flash")
    model, inputs = tiny.flux()
    tracer = Tracer()
    tracer.add(Grab())
    with tracer.attach(model):
        tiny.run(model, inputs)
    assert len(hits) == len(tracer.sites(model))
