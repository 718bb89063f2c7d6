"""`AttentionCall`: one intercepted attention kernel call, with lazy probabilities and edits.

Every tensor is shown in the canonical layout (batch, heads, length, head_dim) whatever layout the
kernel got. Reading `probs` or `output` computes them once, only when asked. Assigning `query`,
`key`, `value`, `attn_mask`, `probs` or `output` is an edit: the layer's result is then produced from
the edited value, and the fused kernel is skipped rather than run and thrown away.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from . import kernel
from .errors import EditError
from .layout import Layout
from .site import Site

KernelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
ProbsFn = Callable[["AttentionCall", "slice | None"], torch.Tensor]

__all__ = ["AttentionCall"]


class AttentionCall:
    """One attention kernel call at one site, handed to every active observer in rule order.

    Attributes that never change during the call: `site` (name), `kind`, `module`, `step`,
    `timestep`, `index` (the kernel call's position inside one layer call: a layer may call the
    kernel more than once), `scale`, `is_causal`, `enable_gqa`, `text_tokens` / `image_tokens`
    (slices of the key axis, and for joint attention of the query axis too) and `image_hw`.
    """

    def __init__(
        self,
        *,
        site: Site,
        step: int,
        timestep: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None,
        scale: float | None,
        is_causal: bool,
        enable_gqa: bool,
        kernel_fn: KernelFn,
        native_fn: Callable[[], torch.Tensor] | None = None,
        to_canonical: Callable[[torch.Tensor], torch.Tensor] | None = None,
        probs_fn: ProbsFn | None = None,
        precomputed_probs: torch.Tensor | None = None,
        index: int = 0,
        layout: Layout | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self._site = site
        self.step = step
        self._timestep = timestep
        self._query = query
        self._key = key
        self._value = value
        self._attn_mask = attn_mask
        self.scale = scale
        self.is_causal = is_causal
        self.enable_gqa = enable_gqa
        self.index = index
        self.layout = layout if layout is not None else Layout(site.kind)
        self.extra: dict[str, Any] = extra or {}
        self._kernel_fn = kernel_fn
        self._native_fn = native_fn
        self._to_canonical = to_canonical
        self._probs_fn = probs_fn
        self._precomputed = precomputed_probs
        self._probs: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._native_raw: torch.Tensor | None = None
        self._inputs_edited = False
        self._probs_edited = False
        self._output_edited = False

    # What an observer may change on a call (by assignment): saved before each observer runs so that a
    # failing one (under on_error: warn) leaves the call as it found it. References only, no copies:
    # in-place changes to a tensor cannot be undone.
    _STATE = ("_query", "_key", "_value", "_attn_mask", "scale", "is_causal", "enable_gqa", "_probs", "_output",
              "_inputs_edited", "_probs_edited", "_output_edited")  # fmt: skip

    def snapshot(self) -> tuple[Any, ...]:
        """What observers may change, by reference (the tracer's rollback point before each observer)."""
        return tuple(getattr(self, name) for name in self._STATE)

    def restore(self, state: tuple[Any, ...]) -> None:
        """Undo the assignments made since `snapshot()` (a failed observer's half-done edits)."""
        for name, value in zip(self._STATE, state):
            setattr(self, name, value)

    # -- identity ------------------------------------------------------------------------------
    @property
    def site(self) -> str:
        """The site's name (qualified module name)."""
        return self._site.name

    @property
    def site_info(self) -> Site:
        """The full `Site` record (module, adapter, processor class...)."""
        return self._site

    @property
    def kind(self) -> str:
        """`self`, `cross`, `joint` or `linear`."""
        return self._site.kind

    @property
    def is_cross(self) -> bool:
        """True for cross-attention (queries from the image, keys from the text)."""
        return self._site.kind == "cross"

    @property
    def module(self) -> torch.nn.Module:
        """The attention module itself."""
        return self._site.module

    @property
    def timestep(self) -> float | None:
        """The timestep the model's forward got (a float), or None."""
        t = self._timestep
        if t is None:
            return None
        if isinstance(t, torch.Tensor):
            return float(t.flatten()[0].item()) if t.numel() else None
        try:
            return float(t)
        except (TypeError, ValueError):
            return None

    @property
    def text_tokens(self) -> slice | None:
        """Key positions of text tokens (for joint attention, query positions too); `layout.text`."""
        return self.layout.text

    @property
    def image_tokens(self) -> slice | None:
        """Query positions of image tokens; `layout.image`."""
        return self.layout.image

    @property
    def image_hw(self) -> tuple[int, int] | None:
        """(height, width) of the image-token grid (one frame); `layout.hw`."""
        return self.layout.hw

    @property
    def heads(self) -> int:
        """Number of query heads."""
        return int(self._query.shape[1])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, Lq, Lk): the shape of `probs`, known without computing them or reading the query (which
        some hand-written sites cannot give). Lk counts the columns of the probabilities' layout."""
        return (*self._query.shape[:3], self._key.shape[-2])  # type: ignore[return-value]

    @property
    def edited(self) -> bool:
        """Whether any observer changed this call."""
        return self._inputs_edited or self._probs_edited or self._output_edited

    @property
    def inputs_edited(self) -> bool:
        """Whether query, key, value or the mask were assigned (probs must then be recomputed)."""
        return self._inputs_edited

    @property
    def computed_probs(self) -> torch.Tensor | None:
        """The probabilities if some observer read or assigned them, else None (never computes)."""
        return self._probs

    # -- inputs --------------------------------------------------------------------------------
    @property
    def query(self) -> torch.Tensor:
        """Queries, (B, H, Lq, D)."""
        return self._query

    @query.setter
    def query(self, value: torch.Tensor) -> None:
        self._set_input("query", value, self._query)
        self._query = value

    @property
    def key(self) -> torch.Tensor:
        """Keys, (B, Hkv, Lk, D)."""
        return self._key

    @key.setter
    def key(self, value: torch.Tensor) -> None:
        self._set_input("key", value, self._key)
        self._key = value

    @property
    def value(self) -> torch.Tensor:
        """Values, (B, Hkv, Lk, Dv)."""
        return self._value

    @value.setter
    def value(self, value: torch.Tensor) -> None:
        self._set_input("value", value, self._value)
        self._value = value

    @property
    def attn_mask(self) -> torch.Tensor | None:
        """The mask the kernel got (boolean: True attends; float: added to scores), or None."""
        return self._attn_mask

    @attn_mask.setter
    def attn_mask(self, value: torch.Tensor | None) -> None:
        self._attn_mask = value
        self._mark_inputs_edited()

    def _set_input(self, name: str, new: torch.Tensor, old: torch.Tensor) -> None:
        if not isinstance(new, torch.Tensor):
            raise EditError(f"call.{name} must be a tensor, got {type(new).__name__}")
        if new.dim() != old.dim() or new.shape[0] != old.shape[0]:
            raise EditError(f"call.{name} must keep the shape {tuple(old.shape)} layout, got {tuple(new.shape)}")
        self._mark_inputs_edited()

    def _mark_inputs_edited(self) -> None:
        self._inputs_edited = True
        self._probs = None
        self._probs_edited = False
        self._output = None
        self._output_edited = False

    # -- probabilities -------------------------------------------------------------------------
    @property
    def probs(self) -> torch.Tensor:
        """Attention probabilities, float32, (B, H, Lq, Lk); computed on first read."""
        if self._probs is None:
            if self._precomputed is not None and not self._inputs_edited:
                self._probs = self._precomputed.float()
            else:
                self._probs = self._compute_probs(None)
        return self._probs

    @probs.setter
    def probs(self, value: torch.Tensor) -> None:
        expected = (*self._query.shape[:-1], self._key.shape[-2])
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(expected):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise EditError(f"call.probs must have shape {tuple(expected)}, got {got}")
        self._probs = value
        self._probs_edited = True
        self._output = None
        self._output_edited = False

    def _compute_probs(self, rows: slice | None) -> torch.Tensor:
        if self._probs_fn is not None:
            return self._probs_fn(self, rows)
        return kernel.attention_probs(
            self._query,
            self._key,
            self._attn_mask,
            scale=self.scale,
            is_causal=self.is_causal,
            enable_gqa=self.enable_gqa,
            rows=rows,
        )

    def iter_probs(
        self, max_bytes: int = 256 * 2**20, batch: slice | None = None
    ) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield `(rows, probs[batch, :, rows, :])` in query chunks of at most about `max_bytes`.

        Uses the full matrix if it already exists; otherwise never materialises it. `batch` restricts
        the computation to some batch items (e.g. the conditional half under classifier-free
        guidance), which saves the work for the others.
        """
        batch = batch or slice(None)
        if self._probs is not None or (self._precomputed is not None and not self._inputs_edited):
            full = self.probs[batch]
            step = kernel.chunk_rows(full, full.shape[-1], max_bytes)
            for start in range(0, full.shape[-2], step):
                rows = slice(start, min(full.shape[-2], start + step))
                yield rows, full[..., rows, :]
            return
        q_len = self._query.shape[-2]
        if self._probs_fn is not None:  # adapter-specific probabilities: computed for all items, then cut
            step = kernel.chunk_rows(self._query, self._key.shape[-2], max_bytes)
            for start in range(0, q_len, step):
                rows = slice(start, min(q_len, start + step))
                yield rows, self._probs_fn(self, rows)[batch]
            return
        query, key, mask = self._query[batch], self._key[batch], self._attn_mask
        if mask is not None and mask.dim() == 4 and mask.shape[0] != 1:
            mask = mask[batch]
        step = kernel.chunk_rows(query, key.shape[-2], max_bytes)
        for start in range(0, q_len, step):
            rows = slice(start, min(q_len, start + step))
            yield rows, kernel.attention_probs(
                query, key, mask, scale=self.scale, is_causal=self.is_causal, enable_gqa=self.enable_gqa, rows=rows
            )

    # -- output --------------------------------------------------------------------------------
    @property
    def output(self) -> torch.Tensor:
        """The attention result before heads merge, (B, H, Lq, Dv); computed on first read."""
        if self._output is None:
            self._output = self._compute_output()
        return self._output

    @output.setter
    def output(self, value: torch.Tensor) -> None:
        current_shape = (*self._query.shape[:-1], self._value.shape[-1])
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(current_shape):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise EditError(f"call.output must have shape {tuple(current_shape)}, got {got}")
        self._output = value
        self._output_edited = True

    def _compute_output(self) -> torch.Tensor:
        if self._probs_edited:
            return kernel.output_from_probs(self._probs, self._value)  # type: ignore[arg-type]
        if not self._inputs_edited and self._native_fn is not None:
            raw = self._native_fn()
            self._native_raw = raw
            return self._to_canonical(raw) if self._to_canonical is not None else raw
        return self._kernel_fn(self._query, self._key, self._value, self._attn_mask)

    def result(self) -> tuple[torch.Tensor, bool]:
        """(output, native): the kernel's own raw result when nothing was edited (native True),
        else the canonical output in the value's dtype."""
        if not self.edited:
            if self._native_raw is None and self._native_fn is not None:
                self._native_raw = self._native_fn()
            if self._native_raw is not None:
                return self._native_raw, True
        out = self.output
        value_dtype = self._value.dtype
        return (out if out.dtype == value_dtype else out.to(value_dtype)), False

    def __repr__(self) -> str:
        return (
            f"AttentionCall(site={self.site!r}, kind={self.kind!r}, step={self.step}, index={self.index}, "
            f"query={tuple(self._query.shape)}, key={tuple(self._key.shape)})"
        )
