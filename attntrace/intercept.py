"""Catching the attention kernel inside a layer: SDPA, diffusers' dispatcher backends, the classic path.

While a proxied processor runs, a `KernelInterceptor` (a `TorchFunctionMode`, one per site) is
active. It catches:
- `F.scaled_dot_product_attention`, whoever calls it (processors directly, or the dispatcher's
  native backends);
- every other backend of diffusers' `dispatch_attention_fn` (flash, sage, xformers, flex, NPU,
  XLA...), through wrappers installed in the dispatcher's registry that find the active interceptor
  on the mode stack and are inert otherwise;
- the classic path `attn.get_attention_scores(q, k, mask)` followed by `torch.bmm(probs, value)`.
Each catch becomes an `AttentionCall` handed to the site's observers; the kernel's own result is
returned untouched unless an observer edited the call.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from . import kernel
from .call import AttentionCall

if TYPE_CHECKING:
    from .observer import Observer
    from .tracer import SiteBinding

__all__ = ["KernelInterceptor", "LayerCall", "infer_hw", "install_dispatch_wrappers", "patch_classic_path"]

_SDPA = F.scaled_dot_product_attention
_BMM = (torch.bmm, torch.Tensor.bmm, torch.matmul, torch.Tensor.matmul)
_CAT = (torch.cat, torch.concat, torch.concatenate)
# Tensor methods written in Python that call `super()`: Dynamo cannot trace that call when a torch-function mode
# hands it the method (a graph break, an error under fullgraph=True: Flux's `query.unflatten(...)`). While
# compiling, the mode calls the equivalent builtin instead.
_UNFLATTEN = torch.Tensor.unflatten


def _bind_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[Any, ...]:
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


def infer_hw(tokens: int, root_hw: tuple[int, int] | None) -> tuple[int, int] | None:
    """The (h, w) grid of `tokens` image tokens, from the model input's spatial size if known."""
    if tokens <= 0:
        return None
    if root_hw is not None:
        H, W = root_hw
        ratio = math.sqrt(H * W / tokens)
        h, w = round(H / ratio), round(W / ratio)
        if h * w == tokens:
            return h, w
    side = math.isqrt(tokens)
    return (side, side) if side * side == tokens else None


@dataclass
class LayerCall:
    """What one call of a proxied processor knows: its arguments' lengths and its observers."""

    observers: list[Observer]
    step: int
    timestep: Any
    image_len: int | None = None
    text_len: int | None = None
    image_hw: tuple[int, int] | None = None
    kernel_calls: int = 0
    text_first: bool | None = None
    classic: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None


class KernelInterceptor(TorchFunctionMode):
    """The per-site torch-function mode active while that site's processor runs."""

    def __init__(self, binding: SiteBinding) -> None:
        super().__init__()
        self.binding = binding
        self.layer: LayerCall | None = None
        self.passthrough = False
        from . import compiled  # registered now: Dynamo cannot trace the weak reference it takes

        self._compiled_key = compiled.register(self)

    def eager_sdpa(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        image_len: int | None,
        text_len: int | None,
        image_hw: tuple[int, int] | None,
    ) -> torch.Tensor:
        """A traced SDPA call made from a compiled graph (the body of `attntrace::sdpa`)."""
        binding = self.binding
        attachment = binding.attachment
        step = attachment.step
        observers = binding.observers_at(step)
        if not observers:
            return _SDPA(*args, **kwargs)
        layer = LayerCall(observers=observers, step=step, timestep=attachment.timestep, image_len=image_len,
                          text_len=text_len, image_hw=image_hw, text_first=binding.text_first)  # fmt: skip
        outer, self.layer = self.layer, layer
        try:
            return self._on_sdpa(layer, args, kwargs)
        finally:
            self.layer = outer

    # -- entry point from the proxy ------------------------------------------------------------
    def run(self, layer: LayerCall, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the original processor with this interceptor active for `layer`."""
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
        attachment = binding.attachment

        def forward(*args: Any, **kwargs: Any) -> Any:
            step = attachment.step
            observers = binding.observers_at(step)
            if not observers:
                return original(*args, **kwargs)
            layer = LayerCall(observers=observers, step=step, timestep=attachment.timestep)
            return self.run(layer, original, args, kwargs)

        return forward

    # -- torch function dispatch ---------------------------------------------------------------
    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is _UNFLATTEN and torch.compiler.is_compiling():
            func = torch.unflatten
        layer = self.layer
        if layer is None or self.passthrough:
            return func(*args, **kwargs)
        if func is _SDPA:
            return self._on_sdpa(layer, args, kwargs)
        if layer.classic is not None and func in _BMM and args and args[0] is layer.classic[3]:
            return self._on_classic_bmm(layer, args, kwargs, func)
        if func in _CAT and layer.text_first is None and layer.text_len:
            self._note_order(layer, args, kwargs)
        return func(*args, **kwargs)

    def _note_order(self, layer: LayerCall, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # Joint attention concatenates image and text tokens; the order decides the token ranges.
        tensors = args[0] if args else kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or len(tensors) != 2 or layer.image_len == layer.text_len:
            return
        try:
            sizes = [t.shape[dim] for t in tensors]
        except (AttributeError, IndexError, TypeError):
            return
        if sizes == [layer.text_len, layer.image_len]:
            layer.text_first = True
        elif sizes == [layer.image_len, layer.text_len]:
            layer.text_first = False
        if layer.text_first is not None:
            self.binding.text_first = layer.text_first

    # -- the three catches ---------------------------------------------------------------------
    def _on_sdpa(self, layer: LayerCall, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # One opaque op in the graph; observers run at run time (see attntrace.compiled).
            from . import compiled

            prev, self.passthrough = self.passthrough, True
            try:
                return compiled.traced_sdpa(self, self._compiled_key, args, kwargs, layer)
            finally:
                self.passthrough = prev
        q, k, v, mask, dropout_p, is_causal, scale, gqa = _bind_sdpa(*args, **kwargs)
        if _scores_skipped(q, v):
            # Layer-skip guidance (skip_attention_scores) replaces the kernel by `value`: no attention ran
            # here, so observers get no call and the site counts as skipped at this step.
            return self._guard(lambda: _SDPA(*args, **kwargs))()
        three_d = q.dim() == 3

        def canon(t: torch.Tensor) -> torch.Tensor:
            return t.unsqueeze(1) if three_d else t

        def native(t: torch.Tensor) -> torch.Tensor:
            return t.squeeze(1) if three_d else t

        def kernel_fn(q2: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor, m2: torch.Tensor | None) -> torch.Tensor:
            if m2 is not None and three_d and m2.dim() == 4:
                m2 = m2.squeeze(1)
            out = _SDPA(
                native(q2), native(k2), native(v2), attn_mask=m2, dropout_p=dropout_p, is_causal=is_causal,
                scale=scale, enable_gqa=gqa,
            )  # fmt: skip
            return canon(out)

        cmask = mask.unsqueeze(1) if (three_d and mask is not None and mask.dim() == 3) else mask
        call = self._make_call(
            layer, canon(q), canon(k), canon(v), cmask, scale, is_causal, gqa,
            kernel_fn=kernel_fn, native_fn=lambda: _SDPA(*args, **kwargs), to_canonical=canon,
        )  # fmt: skip
        out, raw = self._dispatch(layer, call)
        return out if raw else native(out)

    def _on_classic_bmm(
        self, layer: LayerCall, args: tuple[Any, ...], kwargs: dict[str, Any], func: Any
    ) -> torch.Tensor:
        assert layer.classic is not None
        q, k, mask, probs = layer.classic
        layer.classic = None
        value = args[1] if len(args) > 1 else kwargs.get("mat2", kwargs.get("other"))
        module = self.binding.site.module
        heads = int(getattr(module, "heads", 1) or 1)
        bh = q.shape[0]
        if bh % heads:
            heads = 1
        b = bh // heads

        def canon(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, heads, *t.shape[1:])

        def flat(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b * heads, *t.shape[2:])

        scores = self.binding.classic_scores

        def kernel_fn(q2: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor, m2: torch.Tensor | None) -> torch.Tensor:
            assert scores is not None
            p = scores(flat(q2), flat(k2), None if m2 is None else _flat_mask(m2, b * heads))
            return canon(torch.bmm(p, flat(v2)))

        def probs_fn(call: AttentionCall, rows: slice | None) -> torch.Tensor:
            assert scores is not None
            qq = call.query if rows is None else call.query[:, :, rows]
            m = call.attn_mask
            if m is not None and rows is not None and m.shape[-2] != 1:
                m = m[:, :, rows]
            return canon(scores(flat(qq), flat(call.key), None if m is None else _flat_mask(m, b * heads))).float()

        cmask = None if mask is None else mask.reshape(b, -1, *mask.shape[-2:]) if mask.shape[0] == bh else mask
        call = self._make_call(
            layer, canon(q), canon(k), canon(value), cmask, getattr(module, "scale", None), False, False,
            kernel_fn=kernel_fn, native_fn=lambda: func(*args, **kwargs), to_canonical=canon,
            probs_fn=probs_fn, precomputed=canon(probs),
        )  # fmt: skip
        out, raw = self._dispatch(layer, call)
        return out if raw else flat(out)

    def on_backend(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        """A dispatcher backend that never reaches SDPA: (B, L, H, D) tensors in `kwargs`."""
        layer = self.layer
        assert layer is not None
        q, k, v = kwargs["query"], kwargs["key"], kwargs["value"]
        mask = kwargs.get("attn_mask")

        def t(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(1, 2)

        def kernel_fn(q2: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor, m2: torch.Tensor | None) -> torch.Tensor:
            kw = dict(kwargs, query=t(q2), key=t(k2), value=t(v2))
            if "attn_mask" in kwargs:
                kw["attn_mask"] = mask if m2 is cmask else m2
            return t(fn(**kw))

        cmask = mask
        probs_fn = None
        if mask is not None and not isinstance(mask, torch.Tensor):
            # The flex backend takes a BlockMask: the canonical mask stays None (the kernel gets the
            # BlockMask back unless an editor sets a mask); probs densify it row by row on demand.
            cmask = None
            probs_fn = _block_mask_probs(mask)
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape == (q.shape[0], k.shape[1]):
            cmask = mask[:, None, None, :]
        call = self._make_call(
            layer, t(q), t(k), t(v), cmask, kwargs.get("scale"), bool(kwargs.get("is_causal", False)),
            bool(kwargs.get("enable_gqa", False)), kernel_fn=kernel_fn, native_fn=lambda: fn(**kwargs),
            to_canonical=t, probs_fn=probs_fn,
        )  # fmt: skip
        if probs_fn is not None:
            call.extra["block_mask"] = mask
        out, raw = self._dispatch(layer, call)
        return out if raw else t(out).contiguous()

    # -- shared --------------------------------------------------------------------------------
    def _make_call(
        self,
        layer: LayerCall,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float | None,
        is_causal: bool,
        gqa: bool,
        *,
        kernel_fn: Any,
        native_fn: Any,
        to_canonical: Any,
        probs_fn: Any = None,
        precomputed: torch.Tensor | None = None,
    ) -> AttentionCall:
        site = self.binding.site
        index = layer.kernel_calls
        layer.kernel_calls += 1
        text = image = None
        image_hw = layer.image_hw
        lq, lk = q.shape[-2], k.shape[-2]
        if site.kind == "joint" and layer.text_len and layer.image_len and lq == layer.text_len + layer.image_len:
            text_first = layer.text_first if layer.text_first is not None else self.binding.text_first
            if text_first is not None:
                if text_first:
                    text, image = slice(0, layer.text_len), slice(layer.text_len, lq)
                else:
                    image, text = slice(0, layer.image_len), slice(layer.image_len, lq)
        elif site.kind == "cross":
            if layer.text_len is None or lk == layer.text_len:
                text = slice(0, lk)
            image = slice(0, lq)
        else:
            image = slice(0, lq)
        if image is not None and (image_hw is None or image_hw[0] * image_hw[1] != image.stop - image.start):
            image_hw = infer_hw(image.stop - image.start, self.binding.attachment.root_hw)
        return AttentionCall(
            site=site, step=layer.step, timestep=layer.timestep, query=q, key=k, value=v, attn_mask=mask,
            scale=scale, is_causal=is_causal, enable_gqa=gqa, kernel_fn=self._guard(kernel_fn),
            native_fn=self._guard(native_fn), to_canonical=to_canonical, probs_fn=probs_fn,
            precomputed_probs=precomputed, index=index, text_tokens=text, image_tokens=image, image_hw=image_hw,
        )  # fmt: skip

    def _guard(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        # The kernel runs with the interceptor silent, so its inner SDPA is not caught twice.
        def run(*a: Any) -> Any:
            prev, self.passthrough = self.passthrough, True
            try:
                return fn(*a)
            finally:
                self.passthrough = prev

        return run

    def _dispatch(self, layer: LayerCall, call: AttentionCall) -> tuple[torch.Tensor, bool]:
        prev, self.passthrough = self.passthrough, True
        try:
            self.binding.dispatch(call, layer.observers)
            return call._result()
        finally:
            self.passthrough = prev


def _block_mask_probs(block_mask: Any) -> Callable[[AttentionCall, slice | None], torch.Tensor]:
    """Probs for a flex-attention call carrying a `BlockMask`: its mask_mod and block layout, densified."""

    def probs_fn(call: AttentionCall, rows: slice | None) -> torch.Tensor:
        from torch.nn.attention.flex_attention import create_mask

        q, k = call.query, call.key
        lq, lk = q.shape[-2], k.shape[-2]
        start, stop, _ = (rows or slice(0, lq)).indices(lq)
        b, h = block_mask.kv_num_blocks.shape[:2]
        dense = create_mask(block_mask.mask_mod, b, h, lq, lk, q.device)[:, :, start:stop]
        # Blocks left out of the layout are masked whatever mask_mod says.
        bq, bk = block_mask.BLOCK_SIZE
        blocks = block_mask.to_dense().bool()
        blocks = blocks.repeat_interleave(bq, dim=-2).repeat_interleave(bk, dim=-1)[:, :, start:stop, :lk]
        return kernel.attention_probs(q[..., start:stop, :], k, dense & blocks, scale=call.scale,
                                      enable_gqa=call.enable_gqa)  # fmt: skip

    return probs_fn


def _scores_skipped(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether an outer diffusers `AttentionScoreSkipFunctionMode` (layer skip, PAG) returns `value` for this call."""
    if q.dim() < 3 or q.shape[2] != v.shape[2]:  # the mode's own test: it skips only when these agree
        return False
    return any(type(m).__name__ == "AttentionScoreSkipFunctionMode" for m in _get_current_function_mode_stack())


def _flat_mask(mask: torch.Tensor, bh: int) -> torch.Tensor:
    return mask.reshape(bh, *mask.shape[-2:]) if mask.dim() == 4 else mask


def active_interceptor() -> KernelInterceptor | None:
    """The innermost active `KernelInterceptor` on this thread, if any."""
    for mode in reversed(_get_current_function_mode_stack()):
        if isinstance(mode, KernelInterceptor):
            return mode if mode.layer is not None and not mode.passthrough else None
    return None


# -- diffusers' dispatcher registry ------------------------------------------------------------
_SDPA_BACKENDS = {"native", "_native_math", "_native_flash", "_native_efficient", "_native_cudnn"}
_dispatch_lock = threading.Lock()
_dispatch_users = 0
_dispatch_originals: dict[Any, Callable[..., Any]] = {}


class _BackendWrapper:
    """Stands in a dispatcher registry slot; inert unless a site's interceptor is active."""

    def __init__(self, name: Any, fn: Callable[..., Any]) -> None:
        self.name = name
        self.fn = fn
        self.__wrapped__ = fn

    def __call__(self, **kwargs: Any) -> Any:
        mode = active_interceptor()
        if mode is None:
            return self.fn(**kwargs)
        return mode.on_backend(self.fn, kwargs)


def install_dispatch_wrappers() -> Callable[[], None]:
    """Wrap every non-SDPA backend of diffusers' dispatcher (refcounted); returns the undo."""
    global _dispatch_users
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    except Exception:  # diffusers absent or too old: nothing to wrap
        return lambda: None
    with _dispatch_lock:
        if _dispatch_users == 0:
            for name, fn in list(_AttentionBackendRegistry._backends.items()):
                value = getattr(name, "value", name)
                if value in _SDPA_BACKENDS or isinstance(fn, _BackendWrapper):
                    continue
                _dispatch_originals[name] = fn
                _AttentionBackendRegistry._backends[name] = _BackendWrapper(name, fn)
        _dispatch_users += 1

    done = False

    def undo() -> None:
        global _dispatch_users
        nonlocal done
        if done:
            return
        done = True
        with _dispatch_lock:
            _dispatch_users -= 1
            if _dispatch_users == 0:
                for name, fn in _dispatch_originals.items():
                    current = _AttentionBackendRegistry._backends.get(name)
                    if isinstance(current, _BackendWrapper):
                        _AttentionBackendRegistry._backends[name] = fn
                _dispatch_originals.clear()

    return undo


# -- the classic path ---------------------------------------------------------------------------
def patch_classic_path(module: torch.nn.Module, binding: SiteBinding) -> Callable[[], None] | None:
    """Catch `module.get_attention_scores` (the classic processors' path); returns the undo."""
    original = getattr(module, "get_attention_scores", None)
    if original is None or "get_attention_scores" in vars(module):
        return None
    binding.classic_scores = original

    def get_attention_scores(
        query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        probs = original(query, key, attention_mask)
        layer = binding.interceptor.layer if binding.interceptor is not None else None
        if layer is not None and not binding.interceptor.passthrough:  # type: ignore[union-attr]
            layer.classic = (query, key, attention_mask, probs)
        return probs

    module.__dict__["get_attention_scores"] = get_attention_scores

    def undo() -> None:
        if module.__dict__.get("get_attention_scores") is get_attention_scores:
            del module.__dict__["get_attention_scores"]

    return undo
