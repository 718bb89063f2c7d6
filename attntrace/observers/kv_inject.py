"""`kv_inject`: MasaCtrl-style mutual self-attention.

In self-attention, from step `from_step` on, every batch item attends with its own queries to the
keys and values of the source item, in each CFG half alone (as MasaCtrl does). Under a pipeline the
layout and the source come from the generation (its CFG batch and edit group); `cfg` and `source`
are for bare models. Layers are chosen with the
rule's `match`. Edits `call.key`/`call.value`, so the kernel runs once on the edited inputs.

Memory: nothing kept between calls.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..core.call import AttentionCall
from ..core.errors import EditError
from ..core.generation import Generation
from ..core.observer import Observer
from .replace import batch_groups

__all__ = ["KVInject", "KVInjectParams"]


class KVInjectParams(BaseModel):
    """Parameters of `kv_inject`."""

    model_config = ConfigDict(extra="forbid")
    source: int = Field(default=0, ge=0, description="batch item (within each group) giving keys/values")
    from_step: int = Field(default=0, ge=0, description="first step to inject at")
    cfg: bool = Field(default=False, description="batch is [uncond..., cond...]; one source per half")


class KVInject(Observer):
    """Replace self-attention keys/values by the source item's. Keeps nothing."""

    name = "kv_inject"
    needs = frozenset({"key", "value"})
    edits = True
    group_editor = True
    requires_group = True
    Params = KVInjectParams

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.generation: Generation | None = None

    def on_generation_start(self, generation: Generation) -> None:
        self.generation = generation

    def on_generation_end(self, generation: Generation, images: Any | None) -> None:
        self.generation = None

    def on_call(self, call: AttentionCall) -> None:
        if call.kind != "self" or call.step < self.params.from_step:
            return
        gen = self.generation
        cfg, source = self.params.cfg, self.params.source
        if gen is not None:
            if gen.group is None:
                return  # one image: nothing to inject
            cfg, source = gen.cfg, gen.group[0]
        k, v = call.key, call.value
        index = []
        for group in batch_groups(k.shape[0], cfg):
            if source >= len(group):
                raise EditError(f"kv_inject: source {source} outside a group of {len(group)}")
            index += [group[source]] * len(group)
        call.key = k[index]
        call.value = v[index]
