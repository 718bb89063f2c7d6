"""`head_importance`: an example attntrace plugin scoring every attention head of every traced site.

Two metrics, averaged over every call (steps, batch items and query rows):

- `concentration` (default): `1 - H(p) / log(Lk)`, one minus the entropy of each attention row
  normalised by its maximum; 0 for a head that attends uniformly, 1 for a head that looks at one key.
  Needs the probabilities, computed in row chunks of at most `max_chunk_mib` (never the full map).
- `output_norm`: the mean L2 norm of each head's attention output vector; needs no probabilities.

Memory: one float64 vector of length `heads` per site plus a call count; it does not grow with steps.
Uses only attntrace's public API.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from attntrace import AttentionCall, Observer

__all__ = ["HeadImportance", "HeadImportanceParams"]
__version__ = "0.1.0"


class HeadImportanceParams(BaseModel):
    """Parameters of `head_importance`."""

    model_config = ConfigDict(extra="forbid")
    metric: Literal["concentration", "output_norm"] = Field(
        default="concentration", description="concentration (1 - normalised entropy) or output_norm"
    )
    max_chunk_mib: float = Field(default=64.0, gt=0, le=65536, description="probability chunk size limit")


class HeadImportance(Observer):
    """Per site and head: the mean over calls of attention concentration or of the output norm."""

    name = "head_importance"
    needs = frozenset({"probs"})
    Params = HeadImportanceParams

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        # Per instance: output_norm never asks attntrace to compute probabilities.
        self.needs = frozenset({"output"}) if self.params.metric == "output_norm" else frozenset({"probs"})
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def on_call(self, call: AttentionCall) -> None:
        if self.params.metric == "output_norm":
            per_head = call.output.detach().float().norm(dim=-1).sum(dim=(0, 2))  # (H,)
            n = call.output.shape[0] * call.output.shape[2]
        else:
            per_head = None
            n = 0
            lk = call.key.shape[-2]
            log_lk = math.log(lk) if lk > 1 else 1.0
            for _rows, p in call.iter_probs(int(self.params.max_chunk_mib * 2**20)):
                ent = -(p * p.clamp_min(1e-30).log()).sum(-1)  # (B, H, rows)
                conc = (1.0 - ent / log_lk).sum(dim=(0, 2)) if lk > 1 else torch.ones(p.shape[1]) * p.shape[2]
                per_head = conc if per_head is None else per_head + conc
                n += p.shape[0] * p.shape[2]
            assert per_head is not None
        per_head = per_head.double().cpu()
        if call.site in self._sums:
            self._sums[call.site] += per_head
        else:
            self._sums[call.site] = per_head.clone()
        self._counts[call.site] = self._counts.get(call.site, 0) + n

    def result(self) -> dict[str, list[float]]:
        """Site name -> one score per head."""
        return {s: (v / self._counts[s]).tolist() for s, v in self._sums.items()}

    def ranking(self, top: int = 10) -> list[tuple[str, int, float]]:
        """The `top` (site, head, score) triples, highest score first."""
        rows = [(s, h, v) for s, vals in self.result().items() for h, v in enumerate(vals)]
        return sorted(rows, key=lambda r: -r[2])[:top]

    def save(self, directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "head_importance.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"metric": self.params.metric, "scores": self.result()}, indent=1))
        tmp.replace(path)  # never leave a half-written file under the final name
        return [path]

    def close(self) -> None:
        self._sums.clear()
        self._counts.clear()
