"""`attnmaps`: attention maps kept per step and per block (or site) for the explorer (`attntrace report`).

Opt-in: `heatmap` keeps one running sum per grid and nothing per step; `attnmaps` keeps one small map
per (step, group), so the explorer can show how attention moves over steps and layers.

- Diffusion models, cross and joint attention: for each kept batch row the image-query x text-key
  probabilities, reshaped to the image grid and resampled (bilinear) to `resolution` x `resolution`,
  for the first `max_tokens` text tokens: an array (rows, [heads,] tokens, R, R) per (step, group).
- Text models (self-attention without an image grid): the token x token matrix of the first
  `max_tokens` tokens: (rows, [heads,] L, L) per (step, group).
- Other calls (self-attention over image tokens) are ignored: their maps are (image tokens)^2.

Groups: `block` (default) files a site under its block (`down_blocks.1`, `mid_block`,
`transformer_blocks.7`, `encoder.layer.3`), `site` keeps every site apart, `all` pools every site.
Several calls in one (step, group) are averaged.

Cost (float32 while running, float16 when saved): steps x groups x rows x (heads if `heads`) x
tokens x R^2 x 4 bytes. SDXL, 50 steps, 5 blocks, 1 image, 77 tokens, R=32: 79 MB while running,
39 MB saved; the explorer embeds only the prompt's words (about 10), as 8-bit, about 2.5 MB.
`max_mib` bounds it: past it, new (step, group) maps are not kept, with one warning, and the result
says `truncated`.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..core.call import AttentionCall
from ..core.observer import Observer, batch_rows

__all__ = ["AttnMaps", "AttnMapsParams", "site_group"]

_BLOCK = re.compile(r"^(mid_block|.*?(?:blocks?|layers?|h)\.\d+)(?:\.|$)")


def site_group(site: str, group: str = "block") -> str:
    """The group a site is filed under: its block (`down_blocks.1`, `mid_block`, `encoder.layer.3`)."""
    if group == "site":
        return site
    if group == "all":
        return "all"
    m = _BLOCK.match(site)
    return m.group(1) if m else site.rsplit(".", 1)[0]


class AttnMapsParams(BaseModel):
    """Parameters of `attnmaps`."""

    model_config = ConfigDict(extra="forbid")
    resolution: int = Field(default=32, ge=2, le=256, description="side of each kept image map")
    group: Literal["block", "site", "all"] = Field(default="block", description="what one layer entry pools")
    heads: bool = Field(default=False, description="keep every head (x heads memory) instead of the head mean")
    max_tokens: int = Field(default=77, ge=1, le=4096, description="text tokens (or sequence length) kept")
    cond_half: bool = Field(
        default=True, description="keep only the conditional half of an even batch (classifier-free guidance)"
    )
    max_mib: float = Field(default=512.0, gt=0, description="bound on what is kept (float32 while running)")
    max_chunk_mib: float = Field(default=64.0, gt=0, description="peak size of one probability chunk")


class AttnMaps(Observer):
    """Per (step, block) cross-attention maps (diffusion) or token x token maps (text models).

    Keeps steps x groups x rows x (heads) x tokens x R^2 floats, bounded by `max_mib`.
    """

    name = "attnmaps"
    needs = frozenset({"probs"})
    Params = AttnMapsParams

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        # (step, group) -> [sum tensor, calls]
        self.sums: dict[tuple[int, str], list[Any]] = {}
        self.kind: str | None = None
        self.bytes = 0
        self.truncated = False

    def on_call(self, call: AttentionCall) -> None:
        if call.kind in ("cross", "joint") and call.image_hw is not None and call.text_tokens is not None:
            maps = self._image_maps(call)
            kind = "image"
        elif call.kind == "self" and call.image_hw is None:  # no image grid: text (or audio) tokens
            maps = self._token_maps(call)
            kind = "tokens"
        else:
            return
        if maps is None:
            return
        if self.kind is None:
            self.kind = kind
        elif kind != self.kind:
            return  # one kind per observer: the first seen (a model has image maps or token maps)
        key = (call.step, site_group(call.site, self.params.group))
        entry = self.sums.get(key)
        if entry is not None and entry[0].shape == maps.shape:
            entry[0].add_(maps)
            entry[1] += 1
            return
        if entry is not None:  # another shape in the same group (another head count): keep the first
            return
        size = maps.numel() * 4
        if self.bytes + size > self.params.max_mib * 2**20:
            if not self.truncated:
                warnings.warn(
                    f"attnmaps: keeping more than max_mib={self.params.max_mib} MiB of maps; maps from step "
                    f"{call.step} at {key[1]} on are not kept (lower resolution or max_tokens, select steps, "
                    "use group: block, or raise max_mib)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.truncated = True
            return
        self.bytes += size
        self.sums[key] = [maps.float().clone(), 1]

    def _image_maps(self, call: AttentionCall) -> torch.Tensor | None:
        text, image = call.text_tokens, call.image_tokens
        if image is None:
            image = slice(0, call.query.shape[-2])
        h, w = call.image_hw  # type: ignore[misc]
        n_img = image.stop - image.start
        if h * w != n_img:
            return None
        keep = batch_rows(call, self.params.cond_half, strict=False)
        n_text = min(text.stop - text.start, self.params.max_tokens)  # type: ignore[union-attr]
        keys = slice(text.start, text.start + n_text)  # type: ignore[union-attr]
        rows = keep.stop - keep.start
        heads = call.heads if self.params.heads else 1
        out = torch.empty(rows, heads, n_img, n_text, dtype=torch.float32, device=call.query.device)
        for qrows, chunk in call.iter_probs(int(self.params.max_chunk_mib * 2**20), batch=keep):
            lo, hi = max(qrows.start, image.start), min(qrows.stop, image.stop)
            if lo >= hi:
                continue
            part = chunk[:, :, lo - qrows.start : hi - qrows.start, keys].float()
            if not self.params.heads:
                part = part.mean(dim=1, keepdim=True)
            out[:, :, lo - image.start : hi - image.start] = part
        maps = out.transpose(-1, -2).reshape(rows * heads, n_text, h, w)
        r = self.params.resolution
        maps = F.interpolate(maps, size=(r, r), mode="bilinear", align_corners=False)
        maps = maps.reshape(rows, heads, n_text, r, r)
        return maps if self.params.heads else maps[:, 0]

    def _token_maps(self, call: AttentionCall) -> torch.Tensor | None:
        keep = slice(None)  # text models have no guidance halves: every row is a text
        n = min(call.query.shape[-2], call.key.shape[-2], self.params.max_tokens)
        parts = []
        for qrows, chunk in call.iter_probs(int(self.params.max_chunk_mib * 2**20), batch=keep):
            if qrows.start >= n:
                break
            part = chunk[:, :, : n - qrows.start, :n].float()
            parts.append(part if self.params.heads else part.mean(dim=1))
        if not parts:
            return None
        return torch.cat(parts, dim=-2)

    # -- results ---------------------------------------------------------------------------------
    def result(self) -> dict[str, Any]:
        """`{"kind", "steps", "groups", "maps": (steps, groups, rows, [heads,] T, R, R) or (..., L, L),
        "present": (steps, groups) bool, "truncated"}`; missing (step, group) maps are zeros."""
        if not self.sums:
            return {"kind": self.kind, "steps": [], "groups": [], "maps": None, "present": None,
                    "truncated": self.truncated}  # fmt: skip
        steps = sorted({s for s, _ in self.sums})
        groups = list(dict.fromkeys(g for _, g in self.sums))
        shape = max((e[0].shape for e in self.sums.values()), key=lambda s: s.numel())
        maps = torch.zeros(len(steps), len(groups), *shape, dtype=torch.float16)
        present = torch.zeros(len(steps), len(groups), dtype=torch.bool)
        for (s, g), (total, calls) in self.sums.items():
            i, j = steps.index(s), groups.index(g)
            idx = tuple(slice(0, n) for n in total.shape)
            maps[(i, j, *idx)] = (total / calls).to(torch.float16).cpu()
            present[i, j] = True
        return {"kind": self.kind, "steps": steps, "groups": groups, "maps": maps, "present": present,
                "heads": self.params.heads, "truncated": self.truncated}  # fmt: skip

    def save(self, directory: Path) -> list[Path]:
        """Write `attnmaps.safetensors` (maps, present) with the steps/groups/kind in its metadata."""
        from safetensors.torch import save_file

        res = self.result()
        if res["maps"] is None:
            return []
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "attnmaps.safetensors"
        meta = {k: json.dumps(res[k]) for k in ("kind", "steps", "groups", "heads", "truncated")}
        save_file({"maps": res["maps"].contiguous(), "present": res["present"]}, str(path), metadata=meta)
        return [path]

    def close(self) -> None:
        self.sums.clear()
        self.bytes = 0
