"""Fallback adapter for HF transformers attention written by hand (softmax inline, no attention registry).

In transformers 5.24, 112 families (79 entirely, 33 next to registry attention) have attention
classes that compute `softmax(q·kᵀ + bias) @ v` in the module's own `forward` instead of calling
`ALL_ATTENTION_FUNCTIONS` (DeBERTa, BLOOM, Falcon eager, GPT-Neo, MPNet, XLNet, BLIP, LED's decoder,
SAM's vision encoder, BigBird-Pegasus' full encoder attention...; `benchmarks/hf_manual_census.md`).

Sites: modules of a `PreTrainedModel` whose `forward` (or a `self.method` it calls) contains a softmax
and a matrix product and does not use the registry; a module is not a site when one of its
descendants is an attention module (the innermost one computes the attention).

Interception: the module's `forward` is shadowed by an instance attribute that runs the original under
a per-site torch-function mode (`_ManualInterceptor`, a `KernelInterceptor`, so an `F.sdpa` call in the
same module is caught as usual). The mode
- remembers the last few `matmul`/`bmm`/`baddbmm` products: the one whose result has the shape of the
  softmax input gives `query`/`key` (its operands, as the model multiplied them);
- catches the softmax over the last dimension of a 4D (B, H, Lq, Lk) or 3D (B·H, Lq, Lk) tensor: its
  output is `probs`, exactly what `output_attentions=True` returns;
- follows the probabilities through views, casts and dropout to the first operation that consumes
  them; a `matmul`/`bmm`/`einsum` with the probabilities as first operand gives `value` and `output`.
  The call is dispatched there: untouched, that operation's own result is returned (bit-identical);
  edited, the result is rebuilt from the edited probabilities or output.

What cannot be traced is listed with a note and refused at attach: sliding-window chunked scores
(Longformer/LED encoder), block-sparse scores (BigBird), LSH/chunked attention normalised with
`logsumexp` (Reformer), deformable attention (softmax over sampling points, not keys). `query`, `key`,
`value` and the mask cannot be edited at these sites (the scores are not rebuilt from them); observers
that edit them are refused at attach.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..call import AttentionCall
from ..errors import AttachError, EditError
from ..intercept import _SDPA, KernelInterceptor, LayerCall
from ..site import Site
from .base import Adapter, Undo, forward_source

if TYPE_CHECKING:
    from ..tracer import Attachment, SiteBinding

__all__ = ["HEADS_UNKNOWN", "HFManualAdapter", "heads_unknown", "refusal_reason", "shadow_forward"]

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

_REFUSALS = (
    ("_sliding_chunks", "sliding-window chunked attention (Longformer/LED local attention): the scores are "
     "(B, L, H, 2w+1) bands, not a (Lq, Lk) probability matrix"),
    ("block_sparse", "block-sparse attention (BigBird): scores are computed block by block, no (Lq, Lk) "
     "probability matrix exists"),
    ("_concatenate_3_blocks", "block-local attention (LongT5 local): 5D (B, blocks, H, block, 3·block) scores "
     "over each block's 3-block neighbourhood, no (Lq, Lk) probability matrix over the sequence"),
    ("self.w_g", "additive attention (SwiftFormer): a learned vector scores each token, (B, L, 1), and the "
     "softmax pools one global query; there is no softmax(q·kᵀ) over keys"),
    ("hard_softmax(", "slot assignment (GroupViT): the softmax runs over the groups (the query axis; one-hot "
     "in eval) and rows are then renormalised over keys; there is no softmax over keys"),
)  # fmt: skip
# Bahdanau-style additive attention (SLANet's attention GRU cell): `softmax(score(tanh(W·h + U·s)), dim=1)`
# over (B, L, 1) scores for one decoder state.
_ADDITIVE_RE = re.compile(r"\btanh\(")
_ADDITIVE = (
    "additive (Bahdanau) attention: scores are a linear layer on tanh(W·h + U·s), (B, L, 1), softmax over "
    "the tokens for one decoder state; there is no softmax(q·kᵀ) over keys"
)
# Modules whose attention is traced only in part: (source needle, what is not traced).
_PARTIAL = (
    ("compute_local_attention_representations", "only the global tokens' attention (Pegasus-X); the "
     "block-local attention concatenates global and local-block scores in one 5D softmax and slices the "
     "probabilities apart, no (Lq, Lk) matrix, and is not traced"),
)  # fmt: skip
_DEFORMABLE = (
    "deformable attention: the softmax runs over sampling points around reference locations, not over "
    "keys; there is no (Lq, Lk) probability matrix"
)
_LOGSUMEXP = (
    "LSH/chunked attention normalised with logsumexp and exp (Reformer): probabilities are per hash "
    "bucket or chunk, with no softmax over the keys"
)


# -- which classes --------------------------------------------------------------------------------
def _from_transformers(module_name: str) -> bool:
    return module_name.startswith("transformers.")


def _attention_source(cls: type) -> str:
    """`cls.forward`'s source plus that of the transformers helpers it calls as `self.method(...)`."""
    return forward_source(cls, _from_transformers)


# `XSoftmax.apply(` (DeBERTa-v1-style masked softmax as an autograd Function) ends in `torch.softmax`.
_SOFTMAX_RE = re.compile(r"softmax\(|nn\.Softmax\b|Softmax\.apply\(")
# `matmul_qk(`: SqueezeBERT multiplies through small wrapper modules.
_PRODUCT_RE = re.compile(r"\b(matmul\w*|bmm|baddbmm|einsum)\(|\S\s@\s\S")
_QK_RE = re.compile(r"\b(matmul\w*|bmm|baddbmm)\(|\S\s@\s\S")


def _classify(cls: type) -> tuple[bool, str]:
    """(is a hand-written attention class, refusal note or '')."""
    if cls.forward is torch.nn.Module.forward or not cls.__module__.startswith("transformers."):
        return False, ""
    src = _attention_source(cls)
    if "ALL_ATTENTION_FUNCTIONS" in src:
        return False, ""
    if _SOFTMAX_RE.search(src) and ("grid_sample" in src or "sampling_locations" in src):
        return True, _DEFORMABLE
    if not _PRODUCT_RE.search(src):
        return False, ""
    if not _SOFTMAX_RE.search(src):
        if "logsumexp(" in src:
            return True, _LOGSUMEXP
        return False, ""
    for needle, why in _REFUSALS:
        if needle in src:
            return True, why
    if _ADDITIVE_RE.search(src) and "self.score(" in src:
        return True, _ADDITIVE
    return True, ""


def refusal_reason(module: torch.nn.Module) -> str | None:
    """Why `module` (a hand-written attention module) cannot be traced, or None if it can."""
    ok, note = _classify(type(module))
    return note or None if ok else None


_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "heads", "attention_heads")


def _looks_like_attention(module: torch.nn.Module) -> bool:
    """Named like attention or holding a head count (keeps MoE routers and heads' softmaxes out)."""
    name = type(module).__name__.lower()
    return "att" in name or any(isinstance(vars(module).get(a), int) for a in _HEAD_ATTRS)


def _registry_attention(cls: type) -> bool:
    from .base import forward_mentions

    return cls.forward is not torch.nn.Module.forward and forward_mentions(cls, "ALL_ATTENTION_FUNCTIONS")


def _sdpa_attention(cls: type) -> bool:
    from .base import forward_mentions

    return cls.forward is not torch.nn.Module.forward and forward_mentions(cls, "scaled_dot_product_attention(")


# -- the call -------------------------------------------------------------------------------------
class _ManualCall(AttentionCall):
    """A call at a hand-written site: inputs are read-only, some tensors may be missing."""

    missing: frozenset[str] = frozenset()
    where: str = ""

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


def _bhld(t: torch.Tensor | None, lead: torch.Size, b: int, h: int, length: int) -> torch.Tensor | None:
    """`t` (..., length, D), broadcast over the product's leading dims `lead` (multi-query keys), as
    (B, H, length, D); None if it does not fit."""
    if t is None or t.dim() < 2 or t.shape[-2] != length:
        return None
    try:
        t = torch.broadcast_to(t, (*lead, length, t.shape[-1]))
    except RuntimeError:
        return None
    if t.numel() != b * h * length * t.shape[-1]:
        return None
    return t.reshape(b, h, length, t.shape[-1])


class _ManualInterceptor(KernelInterceptor):
    """Per-site mode: catches the softmax, the scores' product and the probabilities' consumer."""

    def __init__(self, binding: SiteBinding, heads: int | None, *, plain: bool = False) -> None:
        super().__init__(binding)
        self.heads = heads
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

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        layer = self.layer
        if layer is None or self.passthrough:
            return func(*args, **kwargs)
        if func is _SDPA:
            return self._on_sdpa(layer, args, kwargs)
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
            qk = _einsum_qk(args)
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
                query = _bhld(a, lead, b, h, lq)
                key = _bhld(m.transpose(-1, -2), lead, b, h, lk) if m.dim() >= 2 else None
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
        if hit == 0 and _swaps_last_two(func, args, kwargs, src, out):
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
                func in (F.dropout, torch.dropout) and not _training(args, kwargs)
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
            canon = _matmul_layout(entry.probs, v_t, out.transpose(-1, -2))
            if canon is not None:
                value, to_c, from_c = canon
                canon_out = lambda t: to_c(t.transpose(-1, -2))  # noqa: E731
                from_canon = lambda t: from_c(t).transpose(-1, -2)  # noqa: E731
        elif flipped:
            pass  # another use of the swapped map: no value/output (probs only)
        elif hit == 0 and func in _MATMUL and len(operands) > 1 and isinstance(operands[1], torch.Tensor):
            canon = _matmul_layout(entry.probs, operands[1], out)
            if canon is not None:
                value, canon_out, from_canon = canon
        elif hit == 0 and func in _EINSUM and len(operands) == 2 and isinstance(args[0], str):
            canon = _einsum_layout(args[0], entry.probs, src, operands[1], out)
            if canon is not None:
                value, canon_out, from_canon = canon
        call = self._call(layer, entry, value, (lambda: out) if value is not None else None, canon_out)
        self._run_observers(layer, call)
        if not call.edited:
            return out
        if value is not None:
            result, raw = call._result()
            if raw:
                return result
            assert from_canon is not None
            return from_canon(result).to(out.dtype)
        # No value: substitute the edited probabilities into the consuming operation itself.
        if flipped:
            edited = call._probs.to(src.dtype).reshape(*src.shape[:-2], src.shape[-1], src.shape[-2])  # type: ignore[union-attr]
            edited = edited.transpose(-1, -2)
        else:
            edited = call._probs.to(src.dtype).reshape(src.shape)  # type: ignore[union-attr]
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
            call = self._call(layer, entry, None, None, None)
            self._run_observers(layer, call)
            if call.edited:
                raise EditError(
                    f"site {self.binding.site.name!r}: the probabilities are not used inside the module, so "
                    "the edit cannot be applied"
                )

    def _run_observers(self, layer: LayerCall, call: AttentionCall) -> None:
        prev, self.passthrough = self.passthrough, True
        try:
            self.binding.dispatch(call, layer.observers)
        finally:
            self.passthrough = prev

    def _call(
        self,
        layer: LayerCall,
        entry: _Pending,
        value: torch.Tensor | None,
        native: Callable[[], torch.Tensor] | None,
        canon_out: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> _ManualCall:
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

        index = layer.kernel_calls
        layer.kernel_calls += 1
        call = _ManualCall(
            site=site, step=layer.step, timestep=layer.timestep, query=query, key=key, value=value,
            attn_mask=None, scale=None, is_causal=False, enable_gqa=False, kernel_fn=kernel_fn,
            native_fn=native, to_canonical=canon_out, precomputed_probs=probs, index=index,
            image_tokens=slice(0, lq) if site.kind == "self" else None,
            text_tokens=slice(0, lk) if site.kind == "cross" else None,
        )  # fmt: skip
        call.missing = frozenset(missing)
        call.where = f"site {site.name!r} ({site.module_class})"
        call.extra["hand_written"] = True
        call.extra["probs_path_exact"] = entry.exact
        return call


def _training(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    # F.dropout(input, p=0.5, training=True, inplace=False); torch.dropout(input, p, train)
    if len(args) > 2:
        return bool(args[2])
    return bool(kwargs.get("training", kwargs.get("train", True)))


_TRANSPOSES = (torch.transpose, torch.Tensor.transpose, torch.permute, torch.Tensor.permute, torch.Tensor.mT)


def _swaps_last_two(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], src: torch.Tensor, out: Any) -> bool:
    """Whether `func` is a transpose/permute of `src` swapping exactly its last two dims."""
    if func not in _TRANSPOSES or not isinstance(out, torch.Tensor) or src.dim() < 2:
        return False
    n = src.dim()
    if func in (torch.permute, torch.Tensor.permute):
        dims = args[1:] if len(args) > 2 or (len(args) == 2 and isinstance(args[1], int)) else (
            args[1] if len(args) > 1 else kwargs.get("dims", ()))  # fmt: skip
        dims = [d % n for d in dims]
        return dims == [*range(n - 2), n - 1, n - 2]
    if func is torch.Tensor.mT:
        return True
    d0 = args[1] if len(args) > 1 else kwargs.get("dim0")
    d1 = args[2] if len(args) > 2 else kwargs.get("dim1")
    return isinstance(d0, int) and isinstance(d1, int) and {d0 % n, d1 % n} == {n - 1, n - 2}


def _matmul_layout(
    probs: torch.Tensor, v: torch.Tensor, out: torch.Tensor
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]] | None:
    """Canonical value, and output to/from canonical, for `probs_alias @ v -> out`."""
    b, h, lq, lk = probs.shape
    if v.dim() < 2 or v.shape[-2] != lk or out.shape[-2] != lq or out.numel() != b * h * lq * out.shape[-1]:
        return None
    dv = v.shape[-1]
    try:
        value = torch.broadcast_to(v, (*out.shape[:-2], lk, dv)).reshape(b, h, lk, dv)
    except RuntimeError:
        return None
    shape = out.shape
    return value, (lambda t: t.reshape(b, h, lq, dv)), (lambda t: t.reshape(shape))


def _einsum_qk(args: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For scores `einsum("<q>,<k>-><lead>ij", q, k)` with one contracted letter: q as (lead, i, d) and
    k as (lead, j, d)... returned as (q, kᵀ) so they read like the operands of `q @ kᵀ`."""
    if len(args) == 2 and isinstance(args[1], (list, tuple)):  # einsum(spec, (a, b))
        args = (args[0], *args[1])
    if len(args) != 3 or not isinstance(args[0], str):
        return None
    a, b = args[1], args[2]
    spec = args[0].replace(" ", "")
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or "->" not in spec or "." in spec:
        return None
    inputs, o = spec.split("->")
    parts = inputs.split(",")
    if len(parts) != 2 or len(o) < 3:
        return None
    x, y = parts
    lead, i, j = o[:-2], o[-2], o[-1]
    contracted = [c for c in x if c in y and c not in o]
    if len(contracted) != 1:
        return None
    d = contracted[0]
    if sorted(x) != sorted(lead + i + d) or sorted(y) != sorted(lead + j + d) or len(set(o)) != len(o):
        return None
    return torch.einsum(f"{x}->{lead}{i}{d}", a), torch.einsum(f"{y}->{lead}{d}{j}", b)


def _einsum_layout(
    spec: str, probs: torch.Tensor, src: torch.Tensor, v: torch.Tensor, out: torch.Tensor
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]] | None:
    """The same for `einsum("<lead>ij,<v>-><o>", probs, v)` with the probabilities in canonical order:
    4D `bhij`, 3D `(B·H)ij` (AttentionPooling's `"bts,bcs->bct"`) or 5D `bngij` whose two head-like axes
    were folded into the probs' head axis (ProphetNet's n-gram stream); `v` and `o` in any letter order."""
    spec = spec.replace(" ", "")
    b, h, lq, lk = probs.shape
    if "->" not in spec or "." in spec or src.numel() != probs.numel() or src.shape[-2:] != (lq, lk):
        return None
    inputs, o = spec.split("->")
    parts = inputs.split(",")
    if len(parts) != 2 or len(parts[0]) != src.dim() or src.dim() not in (3, 4, 5) or len(set(parts[0])) != src.dim():
        return None
    p, vs = parts
    lead, il, jl = p[:-2], p[-2], p[-1]
    extra = [c for c in vs if c not in p]
    if len(extra) != 1 or sorted(vs) != sorted(lead + jl + extra[0]):
        return None
    dl = extra[0]
    canon = f"{lead}{il}{dl}"
    if sorted(o) != sorted(canon):
        return None
    value = torch.einsum(f"{vs}->{lead}{jl}{dl}", v)
    dv = value.shape[-1]
    value = value.reshape(b, h, lk, dv)
    inner = (*src.shape[:-2], lq, dv)
    return (
        value,
        (lambda t: torch.einsum(f"{o}->{canon}", t).reshape(b, h, lq, dv)),
        (lambda t: torch.einsum(f"{canon}->{o}", t.reshape(inner))),
    )


# -- installation (shared with the plain PyTorch adapter) -------------------------------------------
def shadow_forward(binding: SiteBinding, heads: int | None, *, plain: bool = False) -> Undo:
    """Shadow the site module's `forward` with one that runs it under a `_ManualInterceptor`."""
    module = binding.site.module
    if "forward" in vars(module):
        raise AttachError(
            f"site {binding.site.name!r} already has an instance-level forward (another tracer or a "
            "patch); detach or remove it first"
        )
    original = module.forward
    binding.original = original
    interceptor = binding.interceptor = _ManualInterceptor(binding, heads, plain=plain)
    forward = interceptor.forward_for(original)
    module.forward = forward  # an instance attribute shadows the class's forward

    def undo() -> None:
        if vars(module).get("forward") is forward:
            del module.forward

    return undo


HEADS_UNKNOWN = (
    "head count unknown: the scores are a 3D (B·H, Lq, Lk) map (bmm) and the module has no num_heads/heads "
    "attribute, so probs, q/k/v and output cannot be split into heads"
)
_PER_HEAD = frozenset({"query", "key", "value", "probs", "output"})


def heads_unknown(module: torch.nn.Module, heads: int | None, source: str) -> bool:
    """Whether the module multiplies 3D (B·H, L, D) tensors (`bmm`) without a known head count."""
    return heads is None and bool(re.search(r"\b(bmm|baddbmm)\(", source))


# -- the adapter ----------------------------------------------------------------------------------
class HFManualAdapter(Adapter):
    """Traces transformers attention modules that compute the softmax by hand (see module docstring)."""

    name = "transformers-manual"

    def applies_to(self, model: torch.nn.Module) -> bool:
        if "transformers" not in sys.modules:
            return False
        try:
            from transformers import PreTrainedModel
        except ImportError:
            return False
        return isinstance(model, PreTrainedModel)

    def find_sites(self, model: torch.nn.Module) -> list[Site]:
        from .transformers import _heads, _kind

        found: list[tuple[str, torch.nn.Module, str]] = []
        attention_names: list[str] = []
        for name, module in model.named_modules():
            cls = type(module)
            ok, note = _classify(cls)
            if ok and _looks_like_attention(module):
                found.append((name, module, note))
                attention_names.append(name)
            elif _registry_attention(cls) or _sdpa_attention(cls):
                attention_names.append(name)
        sites = []
        for name, module, note in found:
            prefix = f"{name}." if name else ""
            if any(other.startswith(prefix) for other in attention_names if other != name):
                continue  # an inner module computes the attention
            src = _attention_source(type(module))
            unavailable = frozenset() if _QK_RE.search(src) else frozenset({"query", "key"})
            heads = _heads(module)
            for needle, partial in _PARTIAL:
                if not note and needle in src:
                    note = f"hand-written attention, partly traced: {partial}"
            if not note and heads_unknown(module, heads, src):
                note, unavailable = HEADS_UNKNOWN, _PER_HEAD
            sites.append(
                Site(
                    name=name or type(module).__name__,
                    kind=_kind(name, module),
                    module=module,
                    adapter=self.name,
                    processor_class="softmax (hand-written)",
                    heads=heads,
                    note=note or "hand-written attention: probs and output editable, q/k/v read-only",
                    unavailable=unavailable,
                    inputs_editable=False,
                )
            )
        return sites

    def prepare(
        self, model: torch.nn.Module, attachment: Attachment, bindings: list[SiteBinding]
    ) -> Undo | None:
        for b in bindings:
            why = refusal_reason(b.site.module)
            if why:
                raise AttachError(
                    f"{type(model).__name__}: site {b.site.name!r} ({b.site.module_class}) cannot be traced: "
                    f"{why}; exclude it from the rule's match"
                )
        return None

    def install(self, binding: SiteBinding) -> Undo:
        from .transformers import _heads

        return shadow_forward(binding, _heads(binding.site.module))

    def check_restored(self, binding: SiteBinding) -> str | None:
        if "forward" in vars(binding.site.module):
            return f"site {binding.site.name!r}: an instance-level forward is still set"
        return None
