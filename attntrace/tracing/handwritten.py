"""Following a hand-written `softmax(q·kᵀ·scale + bias) @ v` to its query/key, probs, value and output.

Shared by the adapters for hand-written attention (transformers modules with the softmax inline, plain
PyTorch research blocks). The site module's `forward` is shadowed by an instance attribute that runs
the original under a per-site torch-function mode (`ManualInterceptor`, a `KernelInterceptor`, so an
`F.sdpa` call in the same module is caught as usual). The mode
- remembers the last few `matmul`/`bmm`/`baddbmm` products: the one whose result has the shape of the
  softmax input gives `query`/`key` (its operands, as the model multiplied them);
- catches the softmax over the last dimension of a 4D (B, H, Lq, Lk) or 3D (B·H, Lq, Lk) tensor (5D
  windowed scores are folded into heads): its output is `probs`, exactly what `output_attentions=True`
  returns;
- follows the probabilities through views, casts, dropout and a transpose of their last two dims to the
  first operation that consumes them; a `matmul`/`bmm`/`einsum` with the probabilities as an operand
  gives `value` and `output`. The call is dispatched there (`run_call`): untouched, that operation's own
  result is returned (bit-identical); edited, the result is rebuilt from the edited probabilities or
  output. `query`, `key`, `value` and the mask are read-only (the scores are not rebuilt from them).

About 450 lines: one torch-function mode whose handlers (products, softmax, uses of the probabilities)
share its pending state; the pure operand bookkeeping is in `attntrace.tracing.operands`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from ..core.call import AttentionCall
from ..core.errors import AttachError, EditError
from ..core.layout import token_layout
from .binding import LayerCall, SiteBinding
from .intercept import KernelInterceptor
from .operands import bhld, dropout_training, einsum_layout, einsum_qk, matmul_layout, swaps_last_two
from .run import KernelCall, run_call

__all__ = ["HEADS_UNKNOWN", "PER_HEAD", "ManualCall", "ManualInterceptor", "heads_unknown", "shadow_forward"]

_SOFTMAX = (torch.softmax, F.softmax, torch.Tensor.softmax, torch.special.softmax)
_MATMUL = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm)
_BADDBMM = (torch.baddbmm, torch.Tensor.baddbmm)
_EINSUM = (torch.einsum,)
# Ops that carry the probabilities on unchanged (up to dtype) or change values in place of the model
# (dropout in training, head masks): the consumer after them still multiplies "the probabilities".
_SAME = {
    torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.contiguous, torch.Tensor.to,
    torch.Tensor.type, torch.Tensor.type_as, torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16,
    torch.Tensor.double, torch.Tensor.view_as, torch.Tensor.reshape_as,
}  # fmt: skip
_CHANGING = {
    F.dropout, torch.dropout, torch.Tensor.masked_fill, torch.masked_fill, torch.mul, torch.Tensor.mul,
    torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.masked_fill_, torch.Tensor.mul_,
    torch.Tensor.__imul__,
}  # fmt: skip
# In place on the softmax output itself (SEW-D zeroes masked rows): the probs view sees the change.
_IN_PLACE = {torch.Tensor.masked_fill_, torch.Tensor.mul_, torch.Tensor.__imul__}
_KEEP_PRODUCTS = 4


# -- the call -------------------------------------------------------------------------------------
class ManualCall(AttentionCall):
    """A call at a hand-written site: inputs are read-only, some tensors may be missing."""

    def __init__(self, *, missing: frozenset[str] = frozenset(), where: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.missing = missing
        self.where = where

    def _absent(self, name: str) -> EditError:
        return EditError(
            f"{name} is not available at {self.where}: the hand-written attention there did not expose it "
            "(see `attntrace sites`)"
        )

    def _readonly(self, name: str) -> EditError:
        return EditError(
            f"{name} cannot be edited at {self.where}: the module computes its scores by hand, so only "
            "probs and output can be edited"
        )

    @property
    def query(self) -> torch.Tensor:
        if "query" in self.missing:
            raise self._absent("query")
        return self._query

    @query.setter
    def query(self, value: torch.Tensor) -> None:
        raise self._readonly("query")

    @property
    def key(self) -> torch.Tensor:
        if "key" in self.missing:
            raise self._absent("key")
        return self._key

    @key.setter
    def key(self, value: torch.Tensor) -> None:
        raise self._readonly("key")

    @property
    def value(self) -> torch.Tensor:
        if "value" in self.missing:
            raise self._absent("value")
        return self._value

    @value.setter
    def value(self, value: torch.Tensor) -> None:
        raise self._readonly("value")

    @property
    def attn_mask(self) -> torch.Tensor | None:
        return self._attn_mask

    @attn_mask.setter
    def attn_mask(self, value: torch.Tensor | None) -> None:
        raise self._readonly("attn_mask")

    @property
    def output(self) -> torch.Tensor:
        if "output" in self.missing:
            raise self._absent("output")
        return AttentionCall.output.fget(self)  # type: ignore[attr-defined]

    @output.setter
    def output(self, value: torch.Tensor) -> None:
        if "output" in self.missing:
            raise self._absent("output")
        AttentionCall.output.fset(self, value)  # type: ignore[attr-defined]


@dataclass
class _Pending:
    """A softmax output on its way to the operation that consumes it."""

    probs: torch.Tensor  # canonical (B, H, Lq, Lk) view of the softmax output
    query: torch.Tensor | None
    key: torch.Tensor | None
    keep: list[torch.Tensor] = field(default_factory=list)  # every alias (holds ids stable)
    exact: bool = True
    # ids of aliases holding the probabilities with the last two dims swapped, (..., Lk, Lq): LDM-style
    # VAE blocks compute `bmm(v, probs.permute(0, 2, 1))`.
    transposed: set[int] = field(default_factory=set)


class ManualInterceptor(KernelInterceptor):
    """Per-site mode: catches the softmax, the scores' product and the probabilities' consumer."""

    def __init__(
        self, binding: SiteBinding, heads: int | None, *, plain: bool = False, modality: str | None = None
    ) -> None:
        super().__init__(binding)
        self.heads = heads
        self.modality = modality  # what the tokens are (text, image), for the calls' layout
        # Plain PyTorch modules (no `output_attentions` contract): einsum scores count as q·kᵀ products,
        # and a softmax is attention only when its input has the shape of such a product (efficient
        # attention's `q.softmax(-1)` over features is not).
        self.plain = plain
        self.pending: dict[int, _Pending] = {}
        self.products: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def run(self, layer: LayerCall, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        outer = (self.pending, self.products)
        self.pending, self.products = {}, []
        try:
            out = super().run(layer, fn, args, kwargs)
            self._flush(layer)
            return out
        finally:
            self.pending, self.products = outer

    def on_function(self, layer: LayerCall, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if func in _SOFTMAX:
            return self._on_softmax(func, args, kwargs)
        if self.pending:
            operands = args[1:] if func in _EINSUM else args
            if func in _EINSUM and len(operands) == 1 and isinstance(operands[0], (list, tuple)):
                operands = tuple(operands[0])
            hit = next(
                (i for i, a in enumerate(operands) if isinstance(a, torch.Tensor) and id(a) in self.pending), None
            )
            if hit is None and (func in _MATMUL or func in _EINSUM) and operands:
                hit = self._alias(operands[0])
            if hit is not None:
                return self._on_use(layer, func, args, kwargs, operands, hit)
        out = func(*args, **kwargs)
        if func in _EINSUM and isinstance(out, torch.Tensor) and (self.plain or out.dim() == 5):
            # (HF modules: only 5D einsum scores, ProphetNet's n-gram streams (B, ngram, H, Lq, Lk).)
            qk = einsum_qk(args)
            if qk is not None:
                self.products.append((*qk, out))
                del self.products[:-_KEEP_PRODUCTS]
        elif func in _MATMUL or func in _BADDBMM:
            if func in _BADDBMM:  # baddbmm(input, batch1, batch2, *, beta, alpha): alibi + q·kᵀ
                a = args[1] if len(args) > 1 else kwargs.get("batch1")
                b = args[2] if len(args) > 2 else kwargs.get("batch2")
            else:
                a = args[0] if args else kwargs.get("input")
                b = args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2"))
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and isinstance(out, torch.Tensor):
                self.products.append((a, b, out))
                del self.products[:-_KEEP_PRODUCTS]
        return out

    def _alias(self, t: Any) -> int | None:
        """0 if `t` is a same-size alias of pending probabilities that left the mode's sight (an autograd
        Function such as SEW-D's `XSoftmax` returns a new tensor object over the softmax's storage)."""
        if not isinstance(t, torch.Tensor):
            return None
        ptr = t.untyped_storage().data_ptr()
        for entry in {id(e): e for e in self.pending.values()}.values():
            if any(
                s.untyped_storage().data_ptr() == ptr and s.numel() == t.numel() and s.dtype == t.dtype
                for s in entry.keep
            ):
                self.pending[id(t)] = entry
                entry.keep.append(t)
                return 0
        return None

    # -- softmax -----------------------------------------------------------------------------------
    def _on_softmax(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        out = func(*args, **kwargs)
        x = args[0] if args else kwargs.get("input")
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor) or not isinstance(dim, int):
            return out
        if x.dim() not in (3, 4, 5) or dim not in (-1, x.dim() - 1):
            return out  # not a softmax over keys (routers, pooling...)
        lq, lk = x.shape[-2], x.shape[-1]
        matched = any(p.numel() == x.numel() and p.shape[-2:] == x.shape[-2:] for _, _, p in self.products)
        if self.plain and not matched:
            return out  # a softmax over something other than q·kᵀ scores
        if x.dim() == 4:
            b, h = x.shape[0], x.shape[1]
        elif x.dim() == 5:
            # Windowed attention (Hiera's mask units: (B, H, windows, Lq, Lk) = q @ kᵀ): the windows are
            # folded into the head axis, probs are (B, H·windows, Lq, Lk) in the model's own order. 5D
            # scores not made by such a product (einsum over local+global blocks, n-gram streams) are not
            # a per-window (Lq, Lk) matrix and are left alone.
            if not any(p.shape == x.shape for _, _, p in self.products):
                return out
            b, h = x.shape[0], x.shape[1] * x.shape[2]
        elif self.heads and x.shape[0] % self.heads == 0:
            h = self.heads
            b = x.shape[0] // h
        else:
            layer = self.layer
            if layer is not None and any(o.needs or o.edits for o in layer.observers):
                site = self.binding.site
                raise AttachError(
                    f"site {site.name!r} ({site.module_class}): the scores are a 3D (B·H, Lq, Lk) map "
                    f"{tuple(x.shape)} and the module's head count is unknown (no num_heads/heads attribute "
                    f"dividing {x.shape[0]}), so they cannot be split into heads; set the module's `num_heads` "
                    "or exclude the site"
                )
            b, h = x.shape[0], 1  # observers that read nothing (shapes) still see the call
        query = key = None
        for a, m, prod in reversed(self.products):
            if prod.numel() == x.numel() and prod.shape[-2:] == x.shape[-2:]:
                lead = prod.shape[:-2]
                query = bhld(a, lead, b, h, lq)
                key = bhld(m.transpose(-1, -2), lead, b, h, lk) if m.dim() >= 2 else None
                if query is None or key is None or query.shape[-1] != key.shape[-1]:
                    query = key = None
                break
        else:
            # Scores taken from a transposed product (bidirectional attention, Grounding DINO's text-to-image
            # half: S = A·M is the image-to-text map, Sᵀ = Mᵀ·Aᵀ the text-to-image one): query Mᵀ, key A.
            for a, m, prod in reversed(self.products):
                if lq != lk and prod.numel() == x.numel() and prod.shape[-2:] == (lk, lq) and m.dim() >= 2:
                    lead = prod.shape[:-2]
                    query, key = bhld(m.transpose(-1, -2), lead, b, h, lq), bhld(a, lead, b, h, lk)
                    if query is None or key is None or query.shape[-1] != key.shape[-1]:
                        query = key = None
                    break
        entry = _Pending(probs=out.reshape(b, h, lq, lk), query=query, key=key, keep=[out])
        self.pending[id(out)] = entry
        return out

    # -- a use of the probabilities ----------------------------------------------------------------
    def _on_use(
        self,
        layer: LayerCall,
        func: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        operands: tuple[Any, ...],
        hit: int,
    ) -> Any:
        src = operands[hit]
        entry = self.pending[id(src)]
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            return out  # .size(), .dim()...: an inspection, not a use
        flipped = id(src) in entry.transposed
        if hit == 0 and swaps_last_two(func, args, kwargs, src, out):
            # A transpose of the probabilities (not yet their use): follow it, remembering the swap.
            entry.keep.append(out)
            self.pending[id(out)] = entry
            if not flipped:
                entry.transposed.add(id(out))
            return out
        if hit == 0 and (func in _SAME or func in _CHANGING) and out.numel() == src.numel():
            if flipped:
                if out.shape != src.shape:
                    entry.exact = False  # a reshape of the swapped map: no longer followed as probabilities
                else:
                    entry.transposed.add(id(out))
            if func in _CHANGING and func not in _IN_PLACE and not (
                func in (F.dropout, torch.dropout) and not dropout_training(args, kwargs)
            ):
                entry.exact = False
            entry.keep.append(out)
            self.pending[id(out)] = entry
            return out
        # The consumer: dispatch the call here.
        for t in entry.keep:
            self.pending.pop(id(t), None)
        value = canon_out = from_canon = None
        if flipped and hit == 1 and func in _MATMUL and isinstance(operands[0], torch.Tensor):
            # v @ probsᵀ = (probs @ vᵀ)ᵀ: canonical value is vᵀ, canonical output is outᵀ.
            v_t = operands[0].transpose(-1, -2)
            canon = matmul_layout(entry.probs, v_t, out.transpose(-1, -2))
            if canon is not None:
                value, to_c, from_c = canon
                canon_out = lambda t: to_c(t.transpose(-1, -2))  # noqa: E731
                from_canon = lambda t: from_c(t).transpose(-1, -2)  # noqa: E731
        elif flipped:
            pass  # another use of the swapped map: no value/output (probs only)
        elif hit == 0 and func in _MATMUL and len(operands) > 1 and isinstance(operands[1], torch.Tensor):
            canon = matmul_layout(entry.probs, operands[1], out)
            if canon is not None:
                value, canon_out, from_canon = canon
        elif hit == 0 and func in _EINSUM and len(operands) == 2 and isinstance(args[0], str):
            canon = einsum_layout(args[0], entry.probs, src, operands[1], out)
            if canon is not None:
                value, canon_out, from_canon = canon
        kc = self._kernel_call(entry, value, (lambda: out) if value is not None else None, canon_out)
        outcome = run_call(self.binding, layer, kc, quiet=self.silenced, result=value is not None)
        call = outcome.call
        if not call.edited:
            return out
        if value is not None:
            assert outcome.output is not None
            if outcome.native:
                return outcome.output
            assert from_canon is not None
            return from_canon(outcome.output).to(out.dtype)
        # No value: substitute the edited probabilities into the consuming operation itself.
        probs = call.computed_probs
        assert probs is not None
        if flipped:
            edited = probs.to(src.dtype).reshape(*src.shape[:-2], src.shape[-1], src.shape[-2])
            edited = edited.transpose(-1, -2)
        else:
            edited = probs.to(src.dtype).reshape(src.shape)
        if func in _EINSUM:
            ops = list(operands)
            ops[hit] = edited
            return func(args[0], *ops, **kwargs)
        new_args = list(args)
        new_args[hit] = edited
        return func(*new_args, **kwargs)

    def _flush(self, layer: LayerCall) -> None:
        """Probabilities no operation consumed inside the module (only returned): dispatch read-only."""
        seen: set[int] = set()
        entries = [e for e in self.pending.values() if id(e) not in seen and not seen.add(id(e))]  # type: ignore[func-returns-value]
        self.pending = {}
        for entry in entries:
            call = run_call(self.binding, layer, self._kernel_call(entry, None, None, None), quiet=self.silenced,
                            result=False).call  # fmt: skip
            if call.edited:
                raise EditError(
                    f"site {self.binding.site.name!r}: the probabilities are not used inside the module, so "
                    "the edit cannot be applied"
                )

    def _kernel_call(
        self,
        entry: _Pending,
        value: torch.Tensor | None,
        native: Callable[[], torch.Tensor] | None,
        canon_out: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> KernelCall:
        site = self.binding.site
        probs = entry.probs
        b, h, lq, lk = probs.shape
        missing = set()

        def placeholder(length: int) -> torch.Tensor:
            return probs.new_empty((b, h, length, 0))

        query, key = entry.query, entry.key
        if query is None or key is None:
            missing |= {"query", "key"}
            query, key = placeholder(lq), placeholder(lk)
        if value is None:
            missing |= {"value", "output"}
            value = placeholder(lk)

        def kernel_fn(*_: Any) -> torch.Tensor:
            raise EditError(f"site {site.name!r}: hand-written attention cannot be recomputed from edited inputs")

        return KernelCall(
            query=query, key=key, value=value, attn_mask=None, scale=None, is_causal=False, enable_gqa=False,
            kernel_fn=kernel_fn, native_fn=native, to_canonical=canon_out, precomputed_probs=probs,
            layout=token_layout(site.kind, self.modality, lq, lk),
            extra={"hand_written": True, "probs_path_exact": entry.exact},
            make=partial(ManualCall, missing=frozenset(missing), where=f"site {site.name!r} ({site.module_class})"),
        )  # fmt: skip


# -- installation (shared with the plain PyTorch adapter) -------------------------------------------
def shadow_forward(
    binding: SiteBinding, heads: int | None, *, plain: bool = False, modality: str | None = None
) -> Callable[[], None]:
    """Shadow the site module's `forward` with one that runs it under a `ManualInterceptor`."""
    module = binding.site.module
    if "forward" in vars(module):
        raise AttachError(
            f"site {binding.site.name!r} already has an instance-level forward (another tracer or a "
            "patch); detach or remove it first"
        )
    forward = ManualInterceptor(binding, heads, plain=plain, modality=modality).forward_for(module.forward)
    module.forward = forward  # an instance attribute shadows the class's forward

    def undo() -> None:
        if vars(module).get("forward") is forward:
            del module.forward

    return undo


HEADS_UNKNOWN = (
    "head count unknown: the scores are a 3D (B·H, Lq, Lk) map (bmm) and the module has no num_heads/heads "
    "attribute, so probs, q/k/v and output cannot be split into heads"
)
PER_HEAD = frozenset({"query", "key", "value", "probs", "output"})


def heads_unknown(module: torch.nn.Module, heads: int | None, source: str) -> bool:
    """Whether the module multiplies 3D (B·H, L, D) tensors (`bmm`) without a known head count."""
    return heads is None and bool(re.search(r"\b(bmm|baddbmm)\(", source))
