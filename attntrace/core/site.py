"""A site: one attention module of a model, named by its qualified module name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

Kind = Literal["self", "cross", "joint", "linear"]
KINDS: tuple[str, ...] = ("self", "cross", "joint", "linear")


@dataclass
class Site:
    """One attention module found by an adapter.

    `name` is the module's qualified name (`down_blocks.0.attentions.0.transformer_blocks.0.attn1`),
    `kind` what it attends to, `adapter` the framework adapter that found it, and `probs` whether a
    probability matrix exists there (False for linear attention). `unavailable` names call tensors
    (`query`, `key`, `value`, `output`) the site cannot provide, and `inputs_editable` is False where
    query/key/value/mask edits cannot be applied (hand-written attention): observers needing those
    are refused at attach. `traceable` is False for attention-looking modules listed only to say why
    they cannot be traced (`note`); attaching to them is refused. `layout` says how the token layout of
    its calls is resolved (e.g. "text first, joined by the block"), "" for the plain kinds. `probs_layout`
    is the layout of its calls' probabilities (`Layout.probs`: `dense`, `banded` for sliding-window
    attention, `block_sparse` for BigBird, `block_local` for LongT5, `sampling_point` for deformable
    attention); observers that do not declare it in `Observer.probs_layouts` are refused there.
    """

    name: str
    kind: Kind
    module: torch.nn.Module = field(repr=False)
    adapter: str
    processor_class: str | None = None
    heads: int | None = None
    probs: bool = True
    editable: bool = True
    note: str = ""
    unavailable: frozenset[str] = frozenset()
    inputs_editable: bool = True
    traceable: bool = True
    layout: str = ""
    probs_layout: str = "dense"

    @property
    def module_class(self) -> str:
        """The class name of the attention module."""
        return type(self.module).__name__

    def as_row(self) -> dict[str, object]:
        """A plain dict for tables and JSON."""
        return {
            "site": self.name,
            "kind": self.kind,
            "module": self.module_class,
            "processor": self.processor_class or "",
            "heads": self.heads,
            "adapter": self.adapter,
            "probs": self.probs,
            "editable": self.editable,
            "note": self.note,
            "unavailable": sorted(self.unavailable),
            "inputs_editable": self.inputs_editable,
            "traceable": self.traceable,
            "layout": self.layout,
            "probs_layout": self.probs_layout,
        }
