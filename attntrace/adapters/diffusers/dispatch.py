"""diffusers' kernels beyond SDPA: the dispatcher's other backends, the classic path, joint token order.

`ProcessorInterceptor` is the site interceptor for diffusers processors. Besides `F.sdpa` (caught by
the base class) it catches
- every non-SDPA backend of `dispatch_attention_fn` (flash, sage, xformers, flex, NPU, XLA...),
  through wrappers installed in the dispatcher's registry that find the active interceptor on the
  mode stack and are inert otherwise;
- the classic path `attn.get_attention_scores(q, k, mask)` followed by `torch.bmm(probs, value)`;
- the `torch.cat` of image and text tokens inside a joint processor, which tells their order
  (SD3 puts the image first, Flux the text) and so the token layout.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ...core import kernel
from ...core.call import AttentionCall
from ...core.layout import Layout
from ...tracing.binding import LayerCall, SiteBinding
from ...tracing.intercept import KernelInterceptor, active_interceptor
from ...tracing.run import KernelCall
from .layout import Joining, ModelInputs, resolve

__all__ = ["ProcessorInterceptor", "install_dispatch_wrappers", "patch_classic_path"]

_BMM = (torch.bmm, torch.Tensor.bmm, torch.matmul, torch.Tensor.matmul)
_CAT = (torch.cat, torch.concat, torch.concatenate)


@dataclass(eq=False)
class _Classic:
    """What `get_attention_scores` computed, waiting for the `bmm` with the values."""

    query: torch.Tensor
    key: torch.Tensor
    mask: torch.Tensor | None
    probs: torch.Tensor


class ProcessorInterceptor(KernelInterceptor):
    """The interceptor of a diffusers processor site (see the module docstring)."""

    def __init__(self, binding: SiteBinding, join: Joining | None, inputs: ModelInputs) -> None:
        super().__init__(binding)
        self.join = join
        self.inputs = inputs
        self.text_first: bool | None = None  # learned from the first joint call's torch.cat, kept
        self.classic: _Classic | None = None
        self.classic_scores: Callable[..., torch.Tensor] | None = None

    def run(self, layer: LayerCall, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        outer, self.classic = self.classic, None
        try:
            return super().run(layer, fn, args, kwargs)
        finally:
            self.classic = outer

    def on_function(self, layer: LayerCall, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        classic = self.classic
        if classic is not None and func in _BMM and args and args[0] is classic.probs:
            self.classic = None
            return self._on_classic_bmm(layer, classic, args, kwargs, func)
        # Compiling, the order is noted on every trace without reading `text_first` first: reading a value that
        # the first call changes would make it a guard (one recompile per block of a regionally compiled model).
        if func in _CAT and layer.text_len and (torch.compiler.is_compiling() or self.text_first is None):
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
            self.text_first = True
        elif sizes == [layer.image_len, layer.text_len]:
            self.text_first = False

    def layout_for(self, layer: LayerCall, q_len: int, k_len: int) -> Layout:
        site = self.binding.site
        return resolve(site.kind, self.join, layer, self.inputs, q_len, k_len, self.text_first,
                       self.binding.attachment.root_hw)  # fmt: skip

    # -- the classic path --------------------------------------------------------------------------
    def _on_classic_bmm(
        self, layer: LayerCall, classic: _Classic, args: tuple[Any, ...], kwargs: dict[str, Any], func: Any
    ) -> torch.Tensor:
        q, k, mask, probs = classic.query, classic.key, classic.mask, classic.probs
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

        scores = self.classic_scores
        assert scores is not None

        def kernel_fn(q2: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor, m2: torch.Tensor | None) -> torch.Tensor:
            p = scores(flat(q2), flat(k2), None if m2 is None else _flat_mask(m2, b * heads))
            return canon(torch.bmm(p, flat(v2)))

        def probs_fn(call: AttentionCall, rows: slice | None) -> torch.Tensor:
            qq = call.query if rows is None else call.query[:, :, rows]
            m = call.attn_mask
            if m is not None and rows is not None and m.shape[-2] != 1:
                m = m[:, :, rows]
            return canon(scores(flat(qq), flat(call.key), None if m is None else _flat_mask(m, b * heads))).float()

        cmask = None if mask is None else mask.reshape(b, -1, *mask.shape[-2:]) if mask.shape[0] == bh else mask
        cq, ck = canon(q), canon(k)
        outcome = self.run_kernel(layer, KernelCall(
            query=cq, key=ck, value=canon(value), attn_mask=cmask, scale=getattr(module, "scale", None),
            is_causal=False, enable_gqa=False, kernel_fn=kernel_fn, native_fn=lambda: func(*args, **kwargs),
            to_canonical=canon, probs_fn=probs_fn, precomputed_probs=canon(probs),
            layout=self.layout_for(layer, cq.shape[-2], ck.shape[-2]),
        ))  # fmt: skip
        assert outcome.output is not None
        return outcome.output if outcome.native else flat(outcome.output)

    # -- the dispatcher's other backends -----------------------------------------------------------
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
        extra: dict[str, Any] = {}
        if mask is not None and not isinstance(mask, torch.Tensor):
            # The flex backend takes a BlockMask: the canonical mask stays None (the kernel gets the
            # BlockMask back unless an editor sets a mask); probs densify it row by row on demand.
            cmask = None
            probs_fn = _block_mask_probs(mask)
            extra["block_mask"] = mask
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape == (q.shape[0], k.shape[1]):
            cmask = mask[:, None, None, :]
        outcome = self.run_kernel(layer, KernelCall(
            query=t(q), key=t(k), value=t(v), attn_mask=cmask, scale=kwargs.get("scale"),
            is_causal=bool(kwargs.get("is_causal", False)), enable_gqa=bool(kwargs.get("enable_gqa", False)),
            kernel_fn=kernel_fn, native_fn=lambda: fn(**kwargs), to_canonical=t, probs_fn=probs_fn,
            layout=self.layout_for(layer, q.shape[1], k.shape[1]), extra=extra,
        ))  # fmt: skip
        assert outcome.output is not None
        return outcome.output if outcome.native else t(outcome.output).contiguous()


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


def _flat_mask(mask: torch.Tensor, bh: int) -> torch.Tensor:
    return mask.reshape(bh, *mask.shape[-2:]) if mask.dim() == 4 else mask


# -- diffusers' dispatcher registry ------------------------------------------------------------
_SDPA_BACKENDS = {"native", "_native_math", "_native_flash", "_native_efficient", "_native_cudnn"}
_dispatch_lock = threading.Lock()
_dispatch_users = 0
_dispatch_originals: dict[Any, Callable[..., Any]] = {}


class _BackendWrapper:
    """Stands in a dispatcher registry slot; inert unless a processor site's interceptor is active."""

    def __init__(self, name: Any, fn: Callable[..., Any]) -> None:
        self.name = name
        self.fn = fn
        self.__wrapped__ = fn

    def __call__(self, **kwargs: Any) -> Any:
        mode = active_interceptor()
        if not isinstance(mode, ProcessorInterceptor):
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
def patch_classic_path(module: torch.nn.Module, interceptor: ProcessorInterceptor) -> Callable[[], None] | None:
    """Catch `module.get_attention_scores` (the classic processors' path); returns the undo."""
    original = getattr(module, "get_attention_scores", None)
    if original is None or "get_attention_scores" in vars(module):
        return None
    interceptor.classic_scores = original

    def get_attention_scores(
        query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        probs = original(query, key, attention_mask)
        if interceptor.layer is not None and not interceptor.passthrough:
            interceptor.classic = _Classic(query, key, attention_mask, probs)
        return probs

    module.__dict__["get_attention_scores"] = get_attention_scores

    def undo() -> None:
        if module.__dict__.get("get_attention_scores") is get_attention_scores:
            del module.__dict__["get_attention_scores"]

    return undo
