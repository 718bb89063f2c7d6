"""`temperature`: sharpen (tau < 1) or flatten (tau > 1) attention: probs = softmax(scores / tau).

Implemented by dividing the queries by `tau` (scores are linear in the query), so the fused kernel
runs once on the edited query and no probability matrix is materialised: this works at full size
(4096-token self-attention) at no extra memory. Equal to `probs ** (1/tau)` renormalised.

Memory: nothing kept between calls.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..core.call import AttentionCall
from ..core.observer import Observer

__all__ = ["Temperature", "TemperatureParams"]


class TemperatureParams(BaseModel):
    """Parameters of `temperature`."""

    model_config = ConfigDict(extra="forbid")
    tau: float = Field(gt=0, description="temperature: < 1 sharpens, > 1 flattens")


class Temperature(Observer):
    """softmax(scores / tau) at matched sites. Keeps nothing."""

    name = "temperature"
    needs = frozenset({"query"})
    edits = True
    Params = TemperatureParams

    def on_call(self, call: AttentionCall) -> None:
        if self.params.tau != 1.0:
            call.query = call.query / self.params.tau
