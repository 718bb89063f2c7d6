"""Where the operands of a hand-written attention's products sit in the canonical (B, H, L, D) layout.

Pure tensor bookkeeping for `attntrace.tracing.handwritten`: the query/key of a score product
(`q @ kᵀ`, `einsum("bhid,bhjd->bhij")`), the value and output of the product consuming the
probabilities, and whether a transpose swaps a map's last two dims.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["TRANSPOSES", "bhld", "dropout_training", "einsum_layout", "einsum_qk", "matmul_layout", "swaps_last_two"]


def bhld(t: torch.Tensor | None, lead: torch.Size, b: int, h: int, length: int) -> torch.Tensor | None:
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


def dropout_training(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    # F.dropout(input, p=0.5, training=True, inplace=False); torch.dropout(input, p, train)
    if len(args) > 2:
        return bool(args[2])
    return bool(kwargs.get("training", kwargs.get("train", True)))


TRANSPOSES = (torch.transpose, torch.Tensor.transpose, torch.permute, torch.Tensor.permute, torch.Tensor.mT)


def swaps_last_two(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], src: torch.Tensor, out: Any) -> bool:
    """Whether `func` is a transpose/permute of `src` swapping exactly its last two dims."""
    if func not in TRANSPOSES or not isinstance(out, torch.Tensor) or src.dim() < 2:
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


def matmul_layout(
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


def einsum_qk(args: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
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


def einsum_layout(
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
