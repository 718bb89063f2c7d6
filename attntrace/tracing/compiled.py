"""Tracing under `torch.compile`: each traced SDPA call becomes one opaque custom op.

Dynamo would otherwise inline the observer dispatch into the graph: every Python value it reads
(the step counter, the per-site observer cache) becomes a guard, so a pipeline recompiles at every
step and, past the recompile limit, falls back to eager. Instead, while compiling, a traced site's
SDPA call is emitted as `attntrace::sdpa`, a custom op the graph calls at run time. Its body runs in
eager Python: it reads the current step, picks the observers, builds the `AttentionCall`, dispatches
(edits included) and returns the result. No graph break, no per-step recompilation, and observers
see every call of every compiled forward. The op's fake implementation only gives the output shape.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any, Protocol

import torch

from ..core.kernel import sdpa_arguments
from .binding import LayerCall

__all__ = ["SdpaTarget", "register", "traced_sdpa"]


class SdpaTarget(Protocol):
    """What the op's body calls at run time (a site's `KernelInterceptor`)."""

    def eager_sdpa(self, args: tuple[Any, ...], kwargs: dict[str, Any], hints: LayerCall) -> torch.Tensor: ...


_interceptors: weakref.WeakValueDictionary[int, SdpaTarget] = weakref.WeakValueDictionary()
_keys = itertools.count(1)


def register(interceptor: SdpaTarget) -> int:
    """A key the compiled graph carries as a constant to find `interceptor` at run time."""
    key = next(_keys)
    _interceptors[key] = interceptor
    return key


@torch.library.custom_op("attntrace::sdpa", mutates_args=())
def _sdpa_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    site_key: int,
    image_len: int,
    text_len: int,
    image_h: int,
    image_w: int,
) -> torch.Tensor:
    kwargs = {"attn_mask": attn_mask, "dropout_p": dropout_p, "is_causal": is_causal, "scale": scale,
              "enable_gqa": enable_gqa}  # fmt: skip
    interceptor = _interceptors.get(site_key)
    if interceptor is None:  # detached since compilation: the plain kernel
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, **kwargs).contiguous()
    hints = LayerCall(observers=(), step=-1, timestep=None, image_len=image_len or None, text_len=text_len or None,
                      image_hw=(image_h, image_w) if image_h else None)  # fmt: skip
    out = interceptor.eager_sdpa((query, key, value), kwargs, hints)
    # The compiled graph expects the fake implementation's layout (contiguous), and a custom op must not
    # return one of its inputs or a view of one.
    for t in (query, key, value):
        if out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
            return out.clone(memory_format=torch.contiguous_format)
    return out.contiguous()


@_sdpa_op.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *rest: Any) -> torch.Tensor:
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def traced_sdpa(site_key: int, args: tuple[Any, ...], kwargs: dict[str, Any], layer: LayerCall) -> torch.Tensor:
    """The call Dynamo puts in the graph in place of a traced site's SDPA."""
    q, k, v, mask, dropout_p, is_causal, scale, gqa = sdpa_arguments(*args, **kwargs)
    hw = layer.image_hw or (0, 0)
    return torch.ops.attntrace.sdpa(
        q, k, v, mask, float(dropout_p), bool(is_causal), None if scale is None else float(scale), bool(gqa),
        site_key, int(layer.image_len or 0), int(layer.text_len or 0), int(hw[0]), int(hw[1]),
    )  # fmt: skip
