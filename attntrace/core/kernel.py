"""The attention math in one place: probabilities exactly as the fused kernels weigh values.

Everything here works on the canonical layout (batch, heads, length, head_dim) and mirrors
`torch.nn.functional.scaled_dot_product_attention`: optional boolean or additive mask, top-left
aligned causal mask, grouped-query attention (`enable_gqa`), and a default scale of 1/sqrt(D).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

__all__ = [
    "attention_probs",
    "chunk_rows",
    "expand_kv_heads",
    "iter_attention_probs",
    "output_from_probs",
    "sdpa_arguments",
]


def sdpa_arguments(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[Any, ...]:
    """`F.scaled_dot_product_attention`'s arguments, positional or keyword, as one tuple in order."""
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


def expand_kv_heads(kv: torch.Tensor, query_heads: int) -> torch.Tensor:
    """Repeat key/value heads for grouped-query attention (as `enable_gqa=True` does)."""
    kv_heads = kv.shape[-3]
    if kv_heads == query_heads:
        return kv
    if query_heads % kv_heads:
        raise ValueError(f"{query_heads} query heads are not a multiple of {kv_heads} key/value heads")
    return kv.repeat_interleave(query_heads // kv_heads, dim=-3)


def _mask_rows(mask: torch.Tensor, rows: slice) -> torch.Tensor:
    # A mask broadcasts over query rows when its row dimension has size 1.
    if mask.dim() >= 2 and mask.shape[-2] != 1:
        return mask[..., rows, :]
    return mask


def attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    enable_gqa: bool = False,
    rows: slice | None = None,
) -> torch.Tensor:
    """Softmax attention probabilities in float32, shape (B, H, Lq, Lk).

    `rows` restricts the computation to a range of query positions (for chunked reductions).
    Rows whose keys are all masked come out as zeros, as the fused kernels return them.
    """
    q_len, k_len = query.shape[-2], key.shape[-2]
    rows = rows or slice(0, q_len)
    start, stop, _ = rows.indices(q_len)
    q = query[..., start:stop, :].float()
    k = key.float()
    if enable_gqa or (q.dim() == 4 and k.shape[-3] != q.shape[-3]):
        k = expand_kv_heads(k, q.shape[-3])
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    # Scale the smaller operand: q is (Lq, D) per head, the scores (Lq, Lk); D < Lk almost always.
    if k_len > q.shape[-1]:
        scores = torch.matmul(q * scale, k.transpose(-1, -2))
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if is_causal:
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril_(0)[start:stop]
        scores.masked_fill_(~causal, float("-inf"))
    if attn_mask is not None:
        mask = _mask_rows(attn_mask, slice(start, stop))
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1)
    if is_causal or attn_mask is not None:
        # The fused kernels return zeros for query rows whose keys are all masked (softmax gives NaN).
        dead = scores.amax(dim=-1, keepdim=True) == float("-inf")
        probs = probs.masked_fill(dead, 0.0)
    return probs


def chunk_rows(query: torch.Tensor, key_len: int, max_bytes: int) -> int:
    """How many query rows fit one float32 probability chunk of at most `max_bytes`."""
    per_row = 4 * key_len * max(1, query[..., :1, :1].numel())
    # Scores and probs coexist for a moment inside softmax: budget two buffers.
    return max(1, int(max_bytes // (2 * per_row)))


def iter_attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    enable_gqa: bool = False,
    max_bytes: int = 256 * 2**20,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield `(rows, probs[..., rows, :])` in query chunks of at most about `max_bytes` each."""
    q_len = query.shape[-2]
    step = chunk_rows(query, key.shape[-2], max_bytes)
    for start in range(0, q_len, step):
        rows = slice(start, min(q_len, start + step))
        yield rows, attention_probs(
            query, key, attn_mask, scale=scale, is_causal=is_causal, enable_gqa=enable_gqa, rows=rows
        )


def output_from_probs(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`probs @ value` in the value's dtype, expanding grouped key/value heads."""
    value = expand_kv_heads(value, probs.shape[-3]) if value.dim() == 4 else value
    return torch.matmul(probs.to(value.dtype), value)
