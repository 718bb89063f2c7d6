"""`ablate`: zero or mean-replace the outputs of chosen attention heads.

`mode: zero` sets the chosen heads' outputs to zero; `mode: mean` replaces each chosen head's output
at every query position by its mean over query positions (per batch item). Works at any site kind.
The kernel runs once; only its (B, H, L, D) output is changed before heads merge.

Memory: nothing kept between calls.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..core.call import AttentionCall
from ..core.errors import EditError
from ..core.observer import Observer

__all__ = ["Ablate", "AblateParams"]


class AblateParams(BaseModel):
    """Parameters of `ablate`."""

    model_config = ConfigDict(extra="forbid")
    heads: list[int] = Field(min_length=1, description="head indices to ablate")
    mode: Literal["zero", "mean"] = "zero"


class Ablate(Observer):
    """Zero or mean-ablate chosen heads' outputs. Keeps nothing."""

    name = "ablate"
    needs = frozenset({"output"})
    edits = True
    Params = AblateParams

    def on_call(self, call: AttentionCall) -> None:
        heads = self.params.heads
        if any(not -call.heads <= h < call.heads for h in heads):
            raise EditError(f"ablate: heads {heads} out of range for {call.heads} heads at {call.site}")
        out = call.output.clone()
        if self.params.mode == "zero":
            out[:, heads] = 0
        else:
            out[:, heads] = out[:, heads].mean(dim=-2, keepdim=True).expand_as(out[:, heads])
        call.output = out
