"""Read-only attention sites: modules with no (Lq, Lk) scores to intercept that return their probabilities.

Sliding-window (Longformer, LED), block-sparse (BigBird), block-local (LongT5), chunked and LSH (Reformer),
multi-scale deformable (the DETR family) and additive (SLANet) attention return their weights with
`output_attentions=True`, which does not change what they compute; Gemma 3n audio's block-context attention
returns none, and its softmax is read while it runs. `readonly_forward` shadows such a module's
forward, asks for the weights, and hands them to the observers in the layout the site declares
(`Site.probs_layout`, see `Layout.probs`); editors are refused at attach. Each kind has a note (what the
probabilities are; shown on the site) and a reader (how the returned weights become the call's probs).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from ..core.errors import AttachError, AttnTraceError, EditError
from ..core.layout import token_layout
from ..tracing.binding import SiteBinding
from ..tracing.handwritten import ManualCall
from ..tracing.run import KernelCall, run_call
from .base import Undo

__all__ = [
    "ADDITIVE",
    "BANDED",
    "BLOCK_CONTEXT",
    "BLOCK_LOCAL",
    "BLOCK_SPARSE",
    "CHUNKED",
    "LAYOUT_OF",
    "LSH",
    "SAMPLING_POINT",
    "UNAVAILABLE",
    "readonly_forward",
]

# Sliding-window attention returns its banded probabilities with `output_attentions=True`: traced with
# `probs_layout="banded"` (see `Layout.probs`), read-only.
BANDED = (
    "sliding-window attention (Longformer/LED local attention): probs are banded, (B, H, L, global + 2w+1) "
    "as `output_attentions` returns them, not a token x token matrix; read-only (stats, save)"
)
BLOCK_SPARSE = (
    "block-sparse attention (BigBird): probs are (B, H, L, L), zero outside the attended global, sliding "
    "and random blocks, from the module's returned weights; read-only (stats, save)"
)
BLOCK_LOCAL = (
    "block-local attention (LongT5 local / transient-global): probs are (B, H, L, 3·block + global), each "
    "query's weights on the keys of its block and the two next to it, then on the transient global tokens, "
    "as `output_attentions` returns them; read-only (stats, save); output not exposed (returned projected)"
)
SAMPLING_POINT = (
    "multi-scale deformable attention (DETR family): probs are (B, H, Q, levels·points), each query's softmax "
    "over its own sampling points (reference point + learned offset, bilinearly sampled from each feature "
    "level: data-dependent locations, not exposed), as the module returns them; read-only (stats, save); "
    "output not exposed"
)
ADDITIVE = (
    "additive (Bahdanau) attention (SLANet): one decoder state's softmax over the L encoder tokens of "
    "score(tanh(W·h + U·s)), no q·kᵀ; probs are (B, 1, 1, L) as the module returns them; read-only (stats, "
    "save); q/k/v and output not exposed (the module returns the recurrent state)"
)
CHUNKED = (
    "chunked local attention (Reformer LocalSelfAttention): each chunk of queries attends its own chunk and "
    "the chunks before/after it (wrapping around), normalised with logsumexp; probs are (B, H, L, L) as for "
    "block-sparse attention, zero outside the attended chunks, from the module's returned per-chunk weights; "
    "read-only (stats, save)"
)
LSH = (
    "LSH attention (Reformer LSHSelfAttention, one hash round): queries are sorted by hash bucket and each "
    "sorted chunk attends its own chunk and the ones before/after it; probs are (B, H, L, L), zero outside "
    "the keys each query attended, the returned sorted per-chunk weights put back in token order with the "
    "returned buckets; read-only (stats, save)"
)
BLOCK_CONTEXT = (
    "chunked local attention over per-block context windows (Gemma 3n audio): each block of `chunk` frames "
    "attends its own window of `context` frames, starting one block back; probs are (B, H, L, context) as "
    "for block-local attention (column j of query i is the weight on frame (i // chunk - 1)·chunk + j), the "
    "module's softmax read as it runs (it returns no weights); read-only (stats, save)"
)
# Notes of read-only sites -> their `Site.probs_layout`.
LAYOUT_OF = {BANDED: "banded", BLOCK_SPARSE: "block_sparse", BLOCK_LOCAL: "block_local",
             SAMPLING_POINT: "sampling_point", ADDITIVE: "additive", CHUNKED: "block_sparse",
             LSH: "block_sparse", BLOCK_CONTEXT: "block_local"}  # fmt: skip


def _banded(module: torch.nn.Module, out: tuple[Any, ...]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Sliding-window probs (B, L, H, G + 2w+1) as (B, H, L, K), and their layout fields."""
    probs = out[1].transpose(1, 2)
    window = int(module.one_sided_attn_window_size)
    return probs, {"window": window, "global_keys": probs.shape[-1] - (2 * window + 1),
                   "global_probs": out[2] if len(out) > 2 else None}  # fmt: skip


def _block_sparse(module: torch.nn.Module, out: tuple[Any, ...]) -> tuple[torch.Tensor, dict[str, Any]]:
    """BigBird's (B, H, L, L) weights as the weight each key receives. At inference transformers draws no
    random blocks: each row's r random blocks are key block 0 again, attended besides block 0 itself (as a
    global block, or in q[1]'s window), and the returned matrix holds that weight once (rows sum to less
    than 1); the weight block 0 gets is (1 + r) times it. In training the random blocks avoid the window
    and global blocks and the weights are taken as they are."""
    probs = out[1]
    if not module.training:
        bs, r = int(module.block_size), int(module.num_random_blocks)
        probs = probs.clone()  # the caller's weights stay as transformers returns them
        probs[:, :, bs:-bs, :bs] *= 1 + r
    return probs, {"block_size": int(module.block_size)}


def _block_local(module: torch.nn.Module, out: tuple[Any, ...]) -> tuple[torch.Tensor, dict[str, Any]]:
    """LongT5's (B, blocks, H, block, 3·block + G) weights as (B, H, L, 3·block + G) (padding rows dropped)."""
    w = out[-1]
    b, nb, h, bl, k = w.shape
    probs = w.transpose(1, 2).reshape(b, h, nb * bl, k)[:, :, : out[0].shape[1]]
    return probs, {"window": bl, "global_keys": k - 3 * bl}


def _sampling_point(module: torch.nn.Module, out: tuple[Any, ...]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Deformable attention's (B, Q, H, levels, points) or (B, Q, H, Σ points) weights as (B, H, Q, Σ points)."""
    w = out[1]
    b, q, h = w.shape[:3]
    points = getattr(module, "num_points_list", None) or getattr(module, "n_points_list", None)
    if not points:
        points = [int(module.n_points)] * int(module.n_levels)
    return w.reshape(b, q, h, -1).transpose(1, 2), {"points": tuple(int(p) for p in points)}


def _additive(module: torch.nn.Module, out: tuple[Any, ...]) -> tuple[torch.Tensor, dict[str, Any]]:
    """SLANet's (B, 1, L) weights of one decoder state as (B, 1 head, 1 query, L)."""
    return out[1].unsqueeze(1), {}


def _chunk_keys(module: torch.nn.Module, positions: torch.Tensor) -> torch.Tensor:
    """(B, H, L) token positions in the order attended -> (B, H, L, W) the positions each query's weights are on:
    chunks of `chunk_length`, each with its `num_chunks_before/after` neighbours, by the module's own helpers."""
    b, h, length = positions.shape
    chunk = int(module.chunk_length)
    keys = module._look_adjacent(positions.view(b, h, length // chunk, chunk), module.num_chunks_before,
                                 module.num_chunks_after)  # fmt: skip
    return keys.unsqueeze(3).expand(-1, -1, -1, chunk, -1).reshape(b, h, length, -1)


def _scatter_dense(weights: torch.Tensor, keys: torch.Tensor, length: int) -> torch.Tensor:
    """(B, H, L, W) weights on key positions `keys` -> (B, H, L, L), a key repeated in a window summed."""
    dense = weights.new_zeros(*weights.shape[:-1], length)
    return dense.scatter_add_(-1, keys, weights)


def _chunked(module: torch.nn.Module, out: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """Reformer local attention's (B, H, chunks, chunk, W) weights (or (B, H, L, L) on one chunk) as (B, H, L, L)."""
    w = out[1]
    length = out[0].shape[1]
    if w.dim() == 4:  # the sequence fits one chunk: standard attention
        return w, {"block_size": int(module.chunk_length)}
    b, h = w.shape[:2]
    positions = torch.arange(length, device=w.device).expand(b, h, length)
    dense = _scatter_dense(w.reshape(b, h, length, -1), _chunk_keys(module, positions), length)
    return dense, {"block_size": int(module.chunk_length)}


def _lsh(module: torch.nn.Module, out: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """Reformer LSH attention's weights, per sorted chunk, as (B, H, L, L) in token order (one hash round)."""
    w, buckets = out[1], out[2]
    length = out[0].shape[1]
    if w.dim() == 4:  # the sequence fits one chunk: standard attention, in token order
        return w, {"block_size": int(module.chunk_length)}
    b, h = w.shape[:2]
    if buckets.shape[2] != 1:
        raise AttnTraceError(
            f"{type(module).__name__}: LSH attention ran {buckets.shape[2]} hash rounds; their outputs are mixed "
            "with per-round normalisers it does not return, so the weight each key receives is not known; trace "
            "it with num_hashes=1"
        )
    order, _ = module._get_sorted_bucket_idx_and_undo_sorted_bucket_idx(length, buckets.view(b, h, -1), 1)
    sorted_rows = _scatter_dense(w.reshape(b, h, length, -1), _chunk_keys(module, order), length)
    # row p of `sorted_rows` is the query at token position order[p]
    dense = torch.empty_like(sorted_rows)
    dense.scatter_(2, order.unsqueeze(-1).expand_as(sorted_rows), sorted_rows)
    return dense, {"block_size": int(module.chunk_length)}


def _block_context(module: torch.nn.Module, out: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """Gemma 3n audio's softmax (B, H, blocks, chunk, context), read while it ran, as (B, H, L, context)."""
    result, probs = out
    if probs is None:
        raise AttnTraceError(f"{type(module).__name__}: no (B, H, blocks, chunk, context) softmax ran")
    b, h, u, w, c = probs.shape
    return probs.reshape(b, h, u * w, c)[:, :, : result.shape[1]], {"window": w, "global_keys": 0}


class _SoftmaxCapture(TorchFunctionMode):
    """Keeps the last 5D softmax over the last axis computed while active (a module that returns no weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.probs: torch.Tensor | None = None

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in _SOFTMAX and isinstance(out, torch.Tensor) and out.dim() == 5:
            dim = args[1] if len(args) > 1 else (kwargs or {}).get("dim")
            if dim in (-1, 4):
                self.probs = out
        return out


_SOFTMAX = (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax)


# Read-only sites, by note: (how to read the module's returned weights, whether it must be asked for them and
# how many outputs it returns when not asked (None: it always returns them; a namedtuple keeps its fields with
# empty weights), whether its first output is the attention before the output projection).
_READERS: dict[str, tuple[Callable[..., tuple[torch.Tensor, dict[str, Any]]], int | None, bool]] = {
    BANDED: (_banded, 1, True),
    BLOCK_SPARSE: (_block_sparse, None, True),
    BLOCK_LOCAL: (_block_local, 2, False),
    SAMPLING_POINT: (_sampling_point, None, False),
    ADDITIVE: (_additive, None, False),
    CHUNKED: (_chunked, 1, True),
    LSH: (_lsh, 1, True),
    BLOCK_CONTEXT: (_block_context, None, True),
}
# Sites whose module returns no weights: the softmax is read while the module runs.
_CAPTURED = (BLOCK_CONTEXT,)


# What a read-only site does not expose, by note: q/k/v never; the output where the module returns it projected.
UNAVAILABLE = {
    note: frozenset({"query", "key", "value"} | (set() if heads_out else {"output"}))
    for note, (_, _, heads_out) in _READERS.items()
}


def _decoding_from_cache(module: torch.nn.Module, bound: inspect.BoundArguments) -> bool:
    """Whether a Reformer attention call decodes from its cache (the module's own test: a cache holding its layer)."""
    cache = bound.arguments.get("past_buckets_states")
    return cache is not None and len(cache) > int(module.layer_idx)


def readonly_forward(binding: SiteBinding, modality: str | None) -> Undo:
    """Shadow the forward of a module whose attention has no (Lq, Lk) scores to intercept but which returns
    its probabilities (asked with `output_attentions=True` where needed, which does not change its
    computation): hand them to the observers with the site's `probs_layout`, read-only."""
    module = binding.site.module
    if "forward" in vars(module):
        raise AttachError(f"site {binding.site.name!r} already has an instance-level forward; detach it first")
    original = module.forward
    sig = inspect.signature(original)
    layout_name = binding.site.probs_layout
    read, kept, heads_out = _READERS[binding.site.note]
    missing = frozenset({"query", "key", "value"} | (set() if heads_out else {"output"}))

    warned: list[bool] = []

    def forward(*args: Any, **kwargs: Any) -> Any:
        # Modules that must be asked for their weights: their arguments are bound once, read and rewritten.
        bound = sig.bind(*args, **kwargs) if kept is not None else None
        if binding.site.note in (CHUNKED, LSH) and bound is not None and _decoding_from_cache(module, bound):
            if not warned:
                warned.append(True)
                warnings.warn(
                    f"attntrace: site {binding.site.name!r} ({binding.site.module_class}): cached decoding steps "
                    "attend to the cached states Reformer gathers (by chunk or hash bucket), not to token "
                    "positions; those calls are not traced (the prompt's forward is)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return original(*args, **kwargs)
        layer = binding.enter()
        if layer is None:
            return original(*args, **kwargs)
        asked = True
        if bound is not None:
            asked = bool(bound.arguments.get("output_attentions", False))
            bound.arguments["output_attentions"] = True
            args, kwargs = bound.args, bound.kwargs
        if binding.site.note in _CAPTURED:
            with _SoftmaxCapture() as capture:
                result = original(*args, **kwargs)
            out = (result, capture.probs)
        else:
            out = result = original(*args, **kwargs)
        probs, fields = read(module, out)
        b, h, length, k = probs.shape
        # (B, H, L, D): heads before the output projection (a width-0 stand-in where only the projection is returned)
        attn = out[0].view(b, length, h, -1).transpose(1, 2) if heads_out else probs.new_empty((b, h, length, 0))
        shape = {key: fields.pop(key) for key in ("window", "global_keys", "points") if key in fields}
        layout = replace(token_layout(binding.site.kind, modality, length, length), text=None, probs=layout_name,
                         **shape)  # fmt: skip
        call = run_call(binding, layer, KernelCall(
            query=probs.new_empty((b, h, length, 0)), key=probs.new_empty((b, h, k, 0)),
            value=probs.new_empty((b, h, k, attn.shape[-1])), attn_mask=None, scale=None, is_causal=False,
            enable_gqa=False, kernel_fn=_no_kernel(binding), native_fn=lambda: attn, precomputed_probs=probs,
            layout=layout, extra={"hand_written": True, **fields},
            make=partial(ManualCall, missing=missing,
                         where=f"site {binding.site.name!r} ({binding.site.module_class})"),
        ), result=False).call  # fmt: skip
        if call.edited:  # editors are refused at attach; an observer that edits anyway is not ignored
            raise EditError(f"site {binding.site.name!r}: {layout_name} probabilities are read-only")
        if asked:
            return result
        return out._replace(attention_probs=()) if hasattr(out, "_replace") else out[:kept]

    module.forward = forward

    def undo() -> None:
        if vars(module).get("forward") is forward:
            del module.forward

    return undo


def _no_kernel(binding: SiteBinding) -> Callable[..., torch.Tensor]:
    def kernel_fn(*_: Any) -> torch.Tensor:
        raise EditError(f"site {binding.site.name!r}: {binding.site.probs_layout} attention cannot be recomputed")

    return kernel_fn
