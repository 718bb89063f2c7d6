"""`set_attention_backend(...)` on the tiny Flux pipeline, for every dispatcher backend that runs on CPU.

In diffusers 0.42.1 with torch 2.13 (CPU) these run: `native`, `_native_flash`, `_native_math` (all through
`F.scaled_dot_product_attention`) and `flex` (flex_attention, never reaching SDPA). `_native_cudnn` and
`_native_efficient` fail untraced ("No viable backend"), the others need packages or devices absent here
(flash-attn, FA3, sage, xformers, torch_npu, torch_xla, `kernels` hub backends). Backends without a CPU
kernel are covered with stand-ins in tests/test_dispatch_backends.py.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch

from attntrace import Tracer
from tests.runtime import harness, pipes

CPU_BACKENDS = ["native", "_native_flash", "_native_math", "flex"]


@pytest.fixture(autouse=True)
def _restore_active_backend() -> Iterator[None]:
    # `ModelMixin.set_attention_backend` also sets diffusers' process-wide active backend (modeling_utils.py),
    # which every processor without its own backend then uses: restore it for the other tests.
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    saved = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(saved)


@pytest.mark.feature("set_attention_backend", "attention backends")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend(backend: str) -> None:
    """`pipe.transformer.set_attention_backend(backend)` before attaching: transparent, sites/steps, edit, detach
    (the processors' `_attention_backend` is what the user set)."""
    pipe = pipes.flux()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.transformer.set_attention_backend(backend)
        harness.check_feature(pipe, pipes.flux_call, edit="single_transformer_blocks.0.attn")
    backends = {getattr(p._attention_backend, "value", p._attention_backend)
                for p in pipe.transformer.attn_processors.values()}  # fmt: skip
    assert backends == {backend}


@pytest.mark.feature("set_attention_backend", "attention backends")
def test_backend_switched_while_attached() -> None:
    """`set_attention_backend` called while the tracer is attached writes through the proxies to the user's
    processors: the switch takes effect (flex's output differs from native's by float round-off) and survives
    detach; the processors are the same objects."""
    pipe = pipes.flux()
    processors = dict(pipe.transformer.attn_processors)
    native = pipes.flux_call(pipe)
    tracer = Tracer()
    rec = tracer.add(harness.Recorder())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with tracer.attach(pipe):
            pipe.transformer.set_attention_backend("flex")
            flex = pipes.flux_call(pipe)
        assert rec.seen
        assert all(getattr(p._attention_backend, "value", None) == "flex" for p in processors.values())
        assert all(pipe.transformer.attn_processors[k] is p for k, p in processors.items())
        untraced_flex = pipes.flux_call(pipe)
    assert torch.equal(flex, untraced_flex)
    torch.testing.assert_close(flex, native, rtol=1e-4, atol=1e-5)


@pytest.mark.feature("text KV cache", "attention backends")
def test_text_kv_cache_scope() -> None:
    """`TextKVCacheConfig` (diffusers.hooks.text_kv_cache) only hooks `NucleusMoEImageTransformerBlock`; its
    pipeline needs a Qwen3-VL text encoder, so it is tested on the model (cached runs are exact by design)."""
    from diffusers.hooks import TextKVCacheConfig

    from tests.coverage_models import CASES

    build = CASES.get("NucleusMoEImageTransformer2DModel")
    if build is None:
        pytest.skip("no tiny NucleusMoE config in the coverage sweep")
    model, inputs = build()
    with torch.no_grad():
        ref = model(**inputs)[0]
    model.enable_cache(TextKVCacheConfig())
    with torch.no_grad(), model.cache_context("cond"):
        cached = [model(**inputs)[0] for _ in range(2)]
    tracer = Tracer()
    rec = tracer.add(harness.Recorder())
    with tracer.attach(model), torch.no_grad(), model.cache_context("cond"):
        traced = [model(**inputs)[0] for _ in range(2)]
    for a, b in zip(cached, traced):
        assert torch.equal(a, b)
    torch.testing.assert_close(cached[0], ref, rtol=1e-5, atol=1e-6)
    sites = {s.name for s in tracer.sites(model)}
    assert {s for s, _ in rec.seen} == sites and {t for _, t in rec.seen} == {0, 1}
    assert rec.max_err < 1e-5
