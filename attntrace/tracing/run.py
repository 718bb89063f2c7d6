"""`run_call`: the one path from an intercepted kernel call to the layer's result.

Every adapter, whatever it intercepts (an SDPA call, a dispatcher backend, the classic
`get_attention_scores` path, the transformers registry, a hand-written softmax, linear attention,
`nn.MultiheadAttention`), describes the call as a `KernelCall` — canonical (B, H, L, D) tensors, how to
run the kernel, how to get the native result, the token layout — and hands it here:

1. step gate: the adapter's entry asks `SiteBinding.enter()` (once per layer call, before any work:
   a layer with nothing due runs untouched) and passes the `LayerCall` it got;
2. build the `AttentionCall`;
3. hand it to the observers in rule order, applying the error policy (a failing observer's edits
   are rolled back; `on_error` decides between detach-and-raise and warn-and-disable);
4. produce the result: the kernel's own raw output when nothing was edited, else the edited one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.call import AttentionCall, KernelFn, ProbsFn
from ..core.generation import Generation
from ..core.layout import Layout
from ..core.observer import Observer
from .binding import LayerCall, SiteBinding

__all__ = ["KernelCall", "Outcome", "dispatch", "run_call"]


@dataclass(eq=False)
class KernelCall:
    """An intercepted kernel call, described by the adapter that caught it (tensors in canonical layout).

    `kernel_fn(q, k, v, mask)` recomputes the kernel from (edited) canonical inputs; `native_fn()` runs
    the kernel exactly as the model called it (its raw result, in the model's layout); `to_canonical`
    turns that raw result into (B, H, Lq, Dv). `probs_fn`/`precomputed_probs` replace the generic
    probability computation where the adapter knows better (the model's own eager function, probs the
    model already computed). `make` builds the call (a subclass for restricted sites).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None
    scale: float | None
    is_causal: bool
    enable_gqa: bool
    kernel_fn: KernelFn
    native_fn: Callable[[], torch.Tensor] | None = None
    to_canonical: Callable[[torch.Tensor], torch.Tensor] | None = None
    probs_fn: ProbsFn | None = None
    precomputed_probs: torch.Tensor | None = None
    layout: Layout | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    make: Callable[..., AttentionCall] = AttentionCall


@dataclass(eq=False)
class Outcome:
    """What `run_call` gives back: the call the observers saw, and the result to return."""

    call: AttentionCall
    output: torch.Tensor | None  # None when the adapter produces the result itself (`result=False`)
    native: bool  # True: `output` is the kernel's own raw result (model layout); else canonical


def dispatch(binding: SiteBinding, call: AttentionCall, observers: Sequence[Observer]) -> None:
    """Hand `call` to `observers` in rule order, applying the error policy."""
    session = binding.attachment
    binding.mark_ran(call.step)
    for observer in observers:
        if observer in session.disabled:
            continue
        state = call.snapshot()
        try:
            observer.on_call(call)
        except Exception as exc:
            call.restore(state)  # a failed observer's half-done edits are not kept (warn policy)
            session.observer_failed(observer, binding.site.name, call.step, exc)


def _labelled(layout: Layout, generation: Generation | None, batch: int) -> Layout:
    """`layout` with its batch rows labelled `cond`/`uncond` by the open generation (unchanged without one)."""
    roles = generation.roles(batch) if generation is not None else None
    return layout if roles is None or roles == layout.batch else layout.labelled(roles)


def run_call(
    binding: SiteBinding,
    layer: LayerCall,
    kc: KernelCall,
    *,
    quiet: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    result: bool = True,
) -> Outcome:
    """Take one intercepted kernel call to its result (see the module docstring).

    `layer`: what `binding.enter()` gave for the layer call this kernel call belongs to. `quiet`: a
    context in which the adapter's own interception is silent while observers and the kernel run.
    `result=False`: dispatch only (the adapter produces the result itself from the call, e.g. through
    the module's output projection).
    """
    index = layer.kernel_calls
    layer.kernel_calls += 1
    layout = _labelled(kc.layout or Layout(binding.site.kind), binding.attachment.current, int(kc.query.shape[0]))
    call = kc.make(
        site=binding.site, step=layer.step, timestep=layer.timestep, query=kc.query, key=kc.key,
        value=kc.value, attn_mask=kc.attn_mask, scale=kc.scale, is_causal=kc.is_causal,
        enable_gqa=kc.enable_gqa, kernel_fn=kc.kernel_fn, native_fn=kc.native_fn, to_canonical=kc.to_canonical,
        probs_fn=kc.probs_fn, precomputed_probs=kc.precomputed_probs, index=index, layout=layout,
        extra=kc.extra,
    )  # fmt: skip
    with quiet() if quiet is not None else contextlib.nullcontext():
        dispatch(binding, call, layer.observers)
        if not result:
            return Outcome(call, None, False)
        output, native = call.result()
    return Outcome(call, output, native)
