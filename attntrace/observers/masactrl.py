"""`masactrl`: MasaCtrl's mutual self-attention (Cao et al., 2023), with its mask-guided variant.

A source and one or more target images are generated as one batch from shared latents. In the chosen
self-attention layers and steps, every target image queries the keys and values of the source image
(within each classifier-free-guidance half: the unconditional target reads the unconditional source,
the conditional target the conditional source); the source itself runs unchanged.

Which layers and steps, as MasaCtrl counts them:
- a *layer* is a self-attention call in call order within one denoiser forward (one transformer block:
  MasaCtrl counts attention modules and halves the count); `start_layer` picks layers from there on,
  or `layers` lists them (MasaCtrl's `layer_idx`);
- a *step* is one denoiser forward of the generation, from 0; `start_step` picks steps from there on,
  `end_step` stops before that step (MasaCtrl's `total_steps`), or `steps` lists them (`step_idx`).
Layers are counted over the self-attention sites the rule matches: keep the default `match: '*'` to
number them as MasaCtrl does.

Mask-guided variant (`mask_source` and `mask_target`, binary (h, w) masks of the foreground): a target
query attends to the source's foreground keys and, separately, to its background keys (the source
mask, resized to the layer's grid by nearest neighbour, is added to the scores, with the excluded
part at the dtype's lowest value); the two results are blended by the target mask resized the same
way: `fg * mask_t + bg * (1 - mask_t)`.

The batch layout (CFG halves, which image is the source) comes from the generation when the tracer
is attached to a pipeline; for a bare denoiser set `cfg`. The plain variant edits `call.key` /
`call.value`, so attention runs once on the edited inputs; the mask-guided variant computes the two
masked attentions of the target rows itself.

Memory: nothing kept between calls but a layer counter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..core.call import AttentionCall
from ..core.errors import ConfigError, EditError
from ..core.observer import Observer

__all__ = ["MasaCtrl", "MasaCtrlParams", "load_mask"]

MaskSpec = str | list[list[float]] | None


class MasaCtrlParams(BaseModel):
    """Parameters of `masactrl` (defaults: MasaCtrl's for Stable Diffusion 1.x)."""

    model_config = ConfigDict(extra="forbid")
    start_step: int = Field(default=4, ge=0, description="first denoising step with mutual self-attention")
    end_step: int | None = Field(default=None, ge=0, description="steps from this one on run unchanged")
    steps: list[int] | None = Field(default=None, description="exact steps (overrides start_step/end_step)")
    start_layer: int = Field(default=10, ge=0, description="first self-attention layer (call order) edited")
    layers: list[int] | None = Field(default=None, description="exact layers (overrides start_layer)")
    source: int = Field(default=0, ge=0, description="the source image (outside an edit group)")
    cfg: bool | None = Field(
        default=None,
        description="denoiser batch is [uncond..., cond...]; default: learnt from the pipeline call",
    )
    mask_source: MaskSpec = Field(default=None, description="foreground mask of the source: image path or rows")
    mask_target: MaskSpec = Field(default=None, description="foreground mask of the target: image path or rows")

    @model_validator(mode="after")
    def _check(self) -> MasaCtrlParams:
        if (self.mask_source is None) != (self.mask_target is None):
            raise ValueError("the mask-guided variant needs both mask_source and mask_target")
        return self


class MasaCtrl(Observer):
    """Mutual self-attention control: target images query the source image's keys and values."""

    name = "masactrl"
    needs = frozenset({"query", "key", "value"})
    edits = True
    Params = MasaCtrlParams
    #: Works across the images of one pipeline call (source and targets), which share start latents.
    group_editor = True
    #: In an experiment file, an item that is a single prompt has no target image: an error at validation.
    requires_group = True

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        # Masks given as tensors/arrays/images in Python are kept aside: the params hold only YAML forms.
        given = {k: kwargs.pop(k) for k in ("mask_source", "mask_target") if _is_array(kwargs.get(k))}
        super().__init__(params, **kwargs)
        p = self.params
        self._masks: tuple[torch.Tensor, torch.Tensor] | None = None
        if given or p.mask_source is not None:
            src = given.get("mask_source", p.mask_source)
            tgt = given.get("mask_target", p.mask_target)
            if src is None or tgt is None:
                raise ConfigError("the mask-guided variant needs both mask_source and mask_target", field="with")
            self._masks = (load_mask(src, "mask_source"), load_mask(tgt, "mask_target"))
        self._layer = 0
        self._generation: Any = None
        self.edited_calls = 0

    # -- run state -------------------------------------------------------------------------------
    def on_generation_start(self, generation: Any) -> None:
        self._generation = generation
        self._layer = 0
        self.edited_calls = 0

    def on_step_end(self, step: int) -> None:
        self._layer = 0

    def reset(self) -> None:
        """Forget the generation seen and the count of edited calls."""
        self._layer = 0
        self._generation = None
        self.edited_calls = 0

    def _active(self, step: int, layer: int) -> bool:
        p = self.params
        if p.steps is not None:
            in_steps = step in p.steps
        else:
            in_steps = step >= p.start_step and (p.end_step is None or step < p.end_step)
        in_layers = layer in p.layers if p.layers is not None else layer >= p.start_layer
        return in_steps and in_layers

    def groups(self, batch: int) -> list[tuple[int, list[int]]]:
        """(source row, target rows) for each guidance half of a denoiser batch of `batch` rows."""
        gen = self._generation
        cfg = self.params.cfg if self.params.cfg is not None else (gen.cfg if gen is not None else None)
        if cfg is None:
            raise EditError(
                "masactrl: the batch layout is unknown (a bare denoiser, no pipeline call); "
                "set cfg: true for an [uncond..., cond...] batch or cfg: false, or attach to the pipeline"
            )
        if cfg and batch % 2:
            raise EditError(f"masactrl: cfg needs an even [uncond..., cond...] batch, got {batch} rows")
        images = batch // 2 if cfg else batch
        group = getattr(gen, "group", None) if gen is not None else None
        if group:
            source, targets = group[0], list(group[1:])
        else:
            source = self.params.source
            targets = [i for i in range(images) if i != source]
        if source >= images or any(t >= images for t in targets):
            raise EditError(f"masactrl: source {source} / targets {targets} outside the {images} images of the batch")
        if not targets:
            raise EditError("masactrl: the batch has no target image (pass the source and target prompts together)")
        halves = [0, images] if cfg else [0]
        return [(h + source, [h + t for t in targets]) for h in halves]

    # -- the edit --------------------------------------------------------------------------------
    def on_call(self, call: AttentionCall) -> None:
        if call.kind != "self" or call.index != 0:
            return
        layer = self._layer
        self._layer += 1
        if not self._active(call.step, layer):
            return
        groups = self.groups(call.query.shape[0])
        self.edited_calls += 1
        if self._masks is None:
            k, v = call.key, call.value
            index = list(range(k.shape[0]))
            for src, targets in groups:
                for t in targets:
                    index[t] = src
            call.key = k[index]
            call.value = v[index]
            return
        self._masked(call, groups)

    def _masked(self, call: AttentionCall, groups: list[tuple[int, list[int]]]) -> None:
        q, k, v = call.query, call.key, call.value
        n = q.shape[-2]
        hw = call.image_hw if call.image_hw is not None and call.image_hw[0] * call.image_hw[1] == n else None
        if hw is None:
            side = round(n**0.5)
            if side * side != n:
                raise EditError(f"masactrl: cannot lay {n} query tokens of {call.site} on a grid for the masks")
            hw = (side, side)
        assert self._masks is not None
        mask_s, mask_t = (F.interpolate(m[None, None].to(q.device, torch.float32), hw)[0, 0].flatten()
                          for m in self._masks)  # fmt: skip
        low = torch.finfo(torch.float32).min
        # Scores bias per source key: foreground pass excludes background keys, and the reverse.
        bias_fg = mask_s.masked_fill(mask_s == 0, low)
        bias_bg = mask_s.masked_fill(mask_s == 1, low)
        blend = mask_t[:, None]
        scale = call.scale if call.scale is not None else q.shape[-1] ** -0.5
        out = call.output.clone()  # the unedited result of every row (the source keeps its own)
        for src, targets in groups:
            ks, vs = k[src].float(), v[src].float()
            for t in targets:
                sim = torch.matmul(q[t].float(), ks.transpose(-1, -2)) * scale
                fg = torch.matmul(torch.softmax(sim + bias_fg, dim=-1), vs)
                bg = torch.matmul(torch.softmax(sim + bias_bg, dim=-1), vs)
                out[t] = (fg * blend + bg * (1 - blend)).to(out.dtype)
        call.output = out

    def result(self) -> dict[str, Any]:
        """`{"edited_calls": number of self-attention calls edited}`."""
        return {"edited_calls": self.edited_calls}

    def close(self) -> None:
        self._generation = None


def _is_array(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray)) or hasattr(value, "convert")


def load_mask(spec: Any, field: str = "mask") -> torch.Tensor:
    """A float (h, w) mask from a path to an image (non-zero = 1), nested rows, an array, tensor or PIL image."""
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"mask file {str(path)!r} does not exist", field=field)
        from PIL import Image

        spec = Image.open(path)
    if hasattr(spec, "convert"):
        spec = (np.asarray(spec.convert("L"), dtype=np.float32) > 127).astype(np.float32)
    mask = torch.as_tensor(np.asarray(spec, dtype=np.float32) if not isinstance(spec, torch.Tensor) else spec)
    mask = mask.detach().float().cpu()
    if mask.dim() == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.dim() != 2 or mask.numel() == 0:
        raise ConfigError(f"a mask must be a 2-D (h, w) array, got shape {tuple(mask.shape)}", field=field)
    return mask
