"""Catching `F.scaled_dot_product_attention` inside a layer: the per-site `KernelInterceptor`.

While a traced layer runs (a diffusers processor, a module's `forward`), its site's interceptor (a
`TorchFunctionMode`) is active and catches every `F.scaled_dot_product_attention` call, whoever makes
it. Each catch is described as a `KernelCall` and taken to its result by `run_call`; the kernel's own
result is returned untouched unless an observer edited the call. Framework adapters subclass the
interceptor to catch more (diffusers' dispatcher backends and classic path, a hand-written softmax)
and override `layout_for` to say which tokens are text and image.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from ..core import kernel
from ..core.layout import Layout, grid_for
from . import compiled
from .binding import LayerCall, SiteBinding
from .run import KernelCall, Outcome, run_call

__all__ = ["SDPA", "KernelInterceptor", "active_interceptor"]

#: The function every SDPA catch is keyed on.
SDPA = F.scaled_dot_product_attention


class KernelInterceptor(TorchFunctionMode):
    """The per-site torch-function mode active while that site's layer runs."""

    def __init__(self, binding: SiteBinding) -> None:
        super().__init__()
        self.binding = binding
        self.layer: LayerCall | None = None
        self.passthrough = False
        self.compiled_key = compiled.register(self)  # now: Dynamo cannot trace the weak reference it takes

    # -- entry points ------------------------------------------------------------------------------
    def run(self, layer: LayerCall, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run `fn` (the original processor or forward) with this interceptor active for `layer`."""
        outer = self.layer
        self.layer = layer
        try:
            with self:
                return fn(*args, **kwargs)
        finally:
            self.layer = outer

    def forward_for(self, original: Callable[..., Any]) -> Callable[..., Any]:
        """A module `forward` that runs `original` under this interceptor when observers are due."""
        binding = self.binding

        def forward(*args: Any, **kwargs: Any) -> Any:
            layer = binding.enter()
            if layer is None:
                return original(*args, **kwargs)
            return self.run(layer, original, args, kwargs)

        return forward

    def eager_sdpa(self, args: tuple[Any, ...], kwargs: dict[str, Any], hints: LayerCall) -> torch.Tensor:
        """A traced SDPA call made from a compiled graph (the body of `attntrace::sdpa`)."""
        layer = self.binding.enter()
        if layer is None:
            return SDPA(*args, **kwargs)
        layer.image_len, layer.text_len, layer.image_hw = hints.image_len, hints.text_len, hints.image_hw
        outer, self.layer = self.layer, layer
        try:
            return self.on_sdpa(layer, args, kwargs)
        finally:
            self.layer = outer

    # -- torch function dispatch -------------------------------------------------------------------
    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        layer = self.layer
        if layer is None or self.passthrough:
            return func(*args, **kwargs)
        if func is SDPA:
            return self.on_sdpa(layer, args, kwargs)
        return self.on_function(layer, func, args, kwargs)

    def on_function(self, layer: LayerCall, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Any other torch function the traced layer calls (subclasses catch more kernels here)."""
        return func(*args, **kwargs)

    def on_sdpa(self, layer: LayerCall, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        """An `F.scaled_dot_product_attention` call of the traced layer."""
        if torch.compiler.is_compiling():
            # One opaque op in the graph; observers run at run time (see attntrace.tracing.compiled).
            with self.silenced():
                return compiled.traced_sdpa(self.compiled_key, args, kwargs, layer)
        q, k, v, mask, dropout_p, is_causal, scale, gqa = kernel.sdpa_arguments(*args, **kwargs)
        three_d = q.dim() == 3

        def canon(t: torch.Tensor) -> torch.Tensor:
            return t.unsqueeze(1) if three_d else t

        def native(t: torch.Tensor) -> torch.Tensor:
            return t.squeeze(1) if three_d else t

        def kernel_fn(q2: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor, m2: torch.Tensor | None) -> torch.Tensor:
            if m2 is not None and three_d and m2.dim() == 4:
                m2 = m2.squeeze(1)
            out = SDPA(
                native(q2), native(k2), native(v2), attn_mask=m2, dropout_p=dropout_p, is_causal=is_causal,
                scale=scale, enable_gqa=gqa,
            )  # fmt: skip
            return canon(out)

        cmask = mask.unsqueeze(1) if (three_d and mask is not None and mask.dim() == 3) else mask
        cq, ck = canon(q), canon(k)
        outcome = self.run_kernel(layer, KernelCall(
            query=cq, key=ck, value=canon(v), attn_mask=cmask, scale=scale, is_causal=is_causal, enable_gqa=gqa,
            kernel_fn=kernel_fn, native_fn=lambda: SDPA(*args, **kwargs), to_canonical=canon,
            layout=self.layout_for(layer, cq.shape[-2], ck.shape[-2]),
        ))  # fmt: skip
        assert outcome.output is not None
        return outcome.output if outcome.native else native(outcome.output)

    # -- shared ------------------------------------------------------------------------------------
    def layout_for(self, layer: LayerCall, q_len: int, k_len: int) -> Layout:
        """The token layout of a kernel call with `q_len` queries and `k_len` keys (adapters refine it)."""
        kind = self.binding.site.kind
        if kind == "cross":
            return self.with_grid(layer, Layout(kind, text=slice(0, k_len), image=slice(0, q_len)))
        if kind == "self":
            return self.with_grid(layer, Layout(kind, image=slice(0, q_len)))
        return Layout(kind)

    def with_grid(self, layer: LayerCall, layout: Layout) -> Layout:
        """`layout` with the grid of its image tokens: the layer's own (h, w) if it fits, else inferred
        from the count and the model input's aspect ratio."""
        image = layout.image
        if image is None:
            return layout
        n = image.stop - image.start
        hw = layer.image_hw
        if hw is None or hw[0] * hw[1] != n:
            hw = grid_for(n, self.binding.attachment.root_hw)
        return layout if hw is None else replace(layout, grid=(1, *hw))

    def run_kernel(self, layer: LayerCall, kc: KernelCall) -> Outcome:
        """`run_call` with this interceptor silent while observers and the kernel run."""
        kc.kernel_fn = self.guard(kc.kernel_fn)
        if kc.native_fn is not None:
            kc.native_fn = self.guard(kc.native_fn)
        return run_call(self.binding, layer, kc, quiet=self.silenced)

    @contextlib.contextmanager
    def silenced(self) -> Iterator[None]:
        """While inside, this interceptor lets every call through (its own kernels are not caught twice)."""
        prev, self.passthrough = self.passthrough, True
        try:
            yield
        finally:
            self.passthrough = prev

    def guard(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn`, run with this interceptor silent."""

        def run(*a: Any) -> Any:
            with self.silenced():
                return fn(*a)

        return run


def active_interceptor() -> KernelInterceptor | None:
    """The innermost active `KernelInterceptor` on this thread, if any."""
    for mode in reversed(_get_current_function_mode_stack()):
        if isinstance(mode, KernelInterceptor):
            return mode if mode.layer is not None and not mode.passthrough else None
    return None
