"""`token_map`: token x token attention maps for text models (the bertviz-style view), per layer and head.

For every self-attention call over text (the call's layout names text tokens and no image tokens:
BERT, GPT-2, T5 encoders, a diffusion pipeline's text encoder traced on its own), the probabilities of
one batch item are added into a running sum per site: (heads, tokens, tokens). `result()` gives the mean
per site; `save` writes them (safetensors), one labelled matrix per site (head mean) and
`token_map_grid.png`, layers down and heads across, as bertviz's model view draws them.

Memory: one float32 (heads, tokens, tokens) per traced site; nothing per step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..core.call import AttentionCall
from ..core.errors import RunError
from ..core.observer import Observer

__all__ = ["TokenMap", "TokenMapParams", "render_token_maps"]


class TokenMapParams(BaseModel):
    """Parameters of `token_map`."""

    model_config = ConfigDict(extra="forbid")
    item: int = Field(default=0, ge=0, description="batch item whose maps are kept")
    max_tokens: int = Field(default=512, ge=1, description="refuse sequences longer than this (memory)")


class TokenMap(Observer):
    """Running token x token maps per site: `result()` is {site: (heads, tokens, tokens)}."""

    name = "token_map"
    needs = frozenset({"probs"})
    needs_layout = True
    Params = TokenMapParams

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.sums: dict[str, list[Any]] = {}
        self.tokens: list[str] | None = None

    def on_call(self, call: AttentionCall) -> None:
        layout = call.layout
        if layout.kind != "self" or layout.text is None or layout.image is not None:
            return
        n = call.query.shape[-2]
        if n != call.key.shape[-2] or n > self.params.max_tokens:
            if n > self.params.max_tokens:
                raise RunError(f"token_map: {n} tokens at {call.site} exceed max_tokens={self.params.max_tokens}")
            return
        item = self.params.item
        if item >= call.query.shape[0]:
            raise RunError(f"token_map: item {item} outside a batch of {call.query.shape[0]} at {call.site}")
        probs = torch.cat([p for _, p in call.iter_probs(batch=slice(item, item + 1))], dim=-2)[0].float()
        entry = self.sums.get(call.site)
        if entry is None:
            self.sums[call.site] = [probs.clone(), 1]
        elif entry[0].shape != probs.shape:
            raise RunError(f"token_map: sequence length changed at {call.site}; use one token_map per input")
        else:
            entry[0].add_(probs)
            entry[1] += 1

    def result(self) -> dict[str, torch.Tensor]:
        """The mean (heads, tokens, tokens) map of each site, in the order the sites ran."""
        return {site: total / count for site, (total, count) in self.sums.items()}

    def set_prompt(self, tokenizer: Any, prompt: str) -> None:
        """Label the tokens with the tokenizer's own pieces of `prompt`."""
        ids = tokenizer(prompt)["input_ids"]
        self.tokens = list(tokenizer.convert_ids_to_tokens(ids))

    def set_context(self, prompt: str | None = None, tokens: list[str] | None = None, **_: Any) -> None:
        """Label the tokens (the experiment runner passes the tokens the text encoder saw)."""
        if tokens:
            self.tokens = list(tokens)

    def save(self, directory: Path) -> list[Path]:
        from safetensors.torch import save_file

        maps = self.result()
        if not maps:
            return []
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "token_maps.safetensors"
        save_file({site: m.cpu().contiguous() for site, m in maps.items()}, str(path))
        return [path, *render_token_maps(maps, self.tokens, directory)]

    def close(self) -> None:
        self.sums.clear()


def render_token_maps(maps: dict[str, torch.Tensor], tokens: list[str] | None, out_dir: Path) -> list[Path]:
    """One labelled head-mean matrix per site and `token_map_grid.png` (sites down, heads across)."""
    from matplotlib.figure import Figure

    files: list[Path] = []
    for k, (site, m) in enumerate(maps.items()):
        mean = m.mean(0).numpy()
        n = mean.shape[0]
        labels = tokens if tokens is not None and len(tokens) == n else [str(i) for i in range(n)]
        fig = Figure(figsize=(2 + 0.25 * n, 1.6 + 0.25 * n))
        ax = fig.add_subplot(1, 1, 1)
        ax.imshow(mean, cmap="viridis", vmin=0.0, vmax=max(float(mean.max()), 1e-6))
        ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(n), labels, fontsize=7)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        ax.set_title(f"{site} (head mean)", fontsize=8)
        fig.tight_layout()
        path = out_dir / f"token_map_{k:02d}.png"
        fig.savefig(path, dpi=80)
        files.append(path)
    heads = max(m.shape[0] for m in maps.values())
    prefix, suffix = _shared_parts(list(maps))
    fig = Figure(figsize=(1.2 * heads + 1.5, 1.2 * len(maps) + 0.8))
    fig.suptitle(f"{prefix}*{suffix}" if prefix or suffix else "token maps", fontsize=8)
    for row, (site, m) in enumerate(maps.items()):
        for h in range(m.shape[0]):
            ax = fig.add_subplot(len(maps), heads, row * heads + h + 1)
            ax.imshow(m[h].numpy(), cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            if h == 0:
                ax.set_ylabel(site[len(prefix) : len(site) - len(suffix)] or site, fontsize=7)
            if row == 0:
                ax.set_title(f"head {h}", fontsize=7)
    grid = out_dir / "token_map_grid.png"
    fig.savefig(grid, dpi=80)
    files.append(grid)
    return files


def _shared_parts(names: list[str]) -> tuple[str, str]:
    """The dotted name parts all `names` start and end with (`encoder.layer.`, `.attention.self`)."""
    if len(names) < 2:
        return "", ""
    split = [n.split(".") for n in names]
    head = 0
    while all(len(p) > head + 1 and p[head] == split[0][head] for p in split):
        head += 1
    tail = 0
    while all(len(p) > head + tail + 1 and p[-1 - tail] == split[0][-1 - tail] for p in split):
        tail += 1
    prefix = ".".join(split[0][:head]) + ("." if head else "")
    suffix = ("." if tail else "") + ".".join(split[0][len(split[0]) - tail :]) if tail else ""
    return prefix, suffix
