"""`reweight`: prompt-to-prompt attention reweighting of chosen text tokens.

Multiplies the probabilities towards the chosen text tokens by `factor` (optionally renormalising
each row), on cross-attention and on the image-query x text-key block of joint attention. The
layer's output is then `probs @ value`: the attention is computed once (the fused kernel is skipped).

Memory: nothing kept between calls; each call materialises its probabilities once.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..core.call import AttentionCall
from ..core.errors import EditError
from ..core.observer import Observer

__all__ = ["Reweight", "ReweightParams"]


class ReweightParams(BaseModel):
    """Parameters of `reweight`."""

    model_config = ConfigDict(extra="forbid")
    tokens: list[int] = Field(min_length=1, description="text token positions (as the encoder sees them)")
    factor: float = Field(description="multiplier of the attention to those tokens")
    renormalize: bool = Field(default=False, description="rescale each row to sum to one afterwards")


class Reweight(Observer):
    """Scale attention to chosen text tokens (cross, and joint image->text). Keeps nothing."""

    name = "reweight"
    needs = frozenset({"probs"})
    needs_layout = True
    edits = True
    Params = ReweightParams

    def on_call(self, call: AttentionCall) -> None:
        layout = call.layout
        if layout.kind not in ("cross", "joint"):
            return
        if not layout.known:
            raise EditError(f"reweight: the token layout at {call.site} is unknown ({layout.note}); exclude the site")
        text = layout.text
        if text is None:
            return
        n_text = text.stop - text.start
        bad = [t for t in self.params.tokens if not -n_text <= t < n_text]
        if bad:
            raise EditError(f"reweight: tokens {bad} out of range for {n_text} text tokens at {call.site}")
        probs = call.probs
        cols = torch.tensor([text.start + (t % n_text) for t in self.params.tokens], device=probs.device)
        rows = slice(None) if layout.kind == "cross" else layout.image
        if rows is None:
            return
        new = probs.clone()
        block = new[:, :, rows]
        block[..., cols] = block[..., cols] * self.params.factor
        if self.params.renormalize:
            block /= block.sum(-1, keepdim=True).clamp_min(1e-30)
        new[:, :, rows] = block
        call.probs = new
