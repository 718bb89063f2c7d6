"""Token layouts of diffusers families whose latent stream is not simply the patchified latents.

The generic reading (`layout._image_tokens`) takes the image-token count and grid from a batched
`(B, C, H, W)` / `(B, C, F, H, W)` latent and the config's patch sizes, and assumes the sequence the
attention sees on the image side is exactly those tokens. The families here differ, each in a way its
own forward states:

- Kandinsky 5 and 6 take channels-last video latents `(B, F, H, W, C)`;
- Wan-Animate 2 takes a list of unbatched `(C, F, H, W)` latents;
- Framepack packs clean and downsampled history frames before the frames being generated
  (`_pack_history_states`: 4x history, 2x history, clean, then the current frames), and puts the
  image-prompt tokens (`image_embeds`) before the prompt's in the text stream;
- JoyImage-Edit-Plus packs the target image first, then the reference images, then padding;
- Bria-Fibo 2 runs the image (and its context images) through a refiner, then joins Perceiver "gist"
  latents to them: `[gist, image, context]`, or `[image, context, gist]` when a batch pads gist tokens.

Each reader returns the generated image tokens' count and grid and, for packed streams, where those
tokens sit in each latent-stream length the attention can see (`streams`: length -> offset).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["FamilyInputs", "family_inputs"]

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class FamilyInputs:
    """What a family's own forward says about its image tokens for one call of the model.

    `streams`: for each latent-stream length the attention sees, the offset of the generated image
    tokens in it (other tokens: history, references, gist latents). Empty: the stream is the image.
    `prompt_offset`: tokens the model puts before the prompt's in the text stream.
    `note`: why `grid` is None, where it is.
    """

    image_len: int | None
    grid: Grid | None
    streams: dict[int, int] = field(default_factory=dict)
    prompt_offset: int = 0
    note: str = ""


def _patch3(config: Any) -> tuple[int, int, int]:
    p = config.patch_size
    if isinstance(p, (tuple, list)):
        return (int(p[0]), int(p[1]), int(p[2])) if len(p) == 3 else (1, int(p[0]), int(p[1]))
    pt = getattr(config, "patch_size_t", None)
    return (int(pt) if isinstance(pt, int) and pt > 0 else 1), int(p), int(p)


def _patched(model: torch.nn.Module, fhw: Any) -> Grid:
    """The token grid of latents `fhw` = (frames, height, width) in size, by the config's patch sizes."""
    pt, ph, pw = _patch3(model.config)
    return int(fhw[0]) // pt, int(fhw[1]) // ph, int(fhw[2]) // pw


def _video(model: torch.nn.Module, flat: dict[str, Any], frames_axis: int) -> Grid | None:
    """The token grid of 5-D `hidden_states` whose (frames, height, width) start at `frames_axis`."""
    x = flat.get("hidden_states")
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        return None
    return _patched(model, x.shape[frames_axis : frames_axis + 3])


def _kandinsky(model: torch.nn.Module, flat: dict[str, Any]) -> FamilyInputs | None:
    # `Kandinsky5VisualEmbeddings.forward`: `batch_size, duration, height, width, dim = x.shape`.
    grid = _video(model, flat, 1)
    if grid is None:
        return None
    n = math.prod(grid)
    sparse = flat.get("sparse_params")
    if isinstance(sparse, dict) and sparse.get("to_fractal"):
        # `fractal_flatten` orders the tokens by 8x8 spatial blocks, not row by row.
        return FamilyInputs(n, None, note="sparse attention orders the image tokens in 8x8 blocks (fractal), "
                            "not row by row")  # fmt: skip
    return FamilyInputs(n, grid)


def _wan_animate2(model: torch.nn.Module, flat: dict[str, Any]) -> FamilyInputs | None:
    # A list of unbatched `(C, F, H, W)` latents, joined with `condition_latents` on channels and patchified
    # one by one; every sample holds `seq_len` tokens.
    xs = flat.get("hidden_states")
    if not isinstance(xs, (list, tuple)) or not xs or not all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in xs):
        return None
    grids = {_patched(model, x.shape[1:4]) for x in xs}
    if len(grids) != 1:
        return FamilyInputs(None, None, note="the samples' latents have different grids")
    grid = grids.pop()
    return FamilyInputs(math.prod(grid), grid)


def _conv_tokens(x: Any, conv: Any) -> int:
    """Tokens a 3D patch convolution makes of `x` (B, C, F, H, W), padded up to its kernel (`_pad_for_3d_conv`)."""
    if not isinstance(x, torch.Tensor) or not isinstance(conv, torch.nn.Conv3d):
        return 0
    return math.prod(-(-int(d) // int(k)) for d, k in zip(x.shape[2:], conv.kernel_size))


def _framepack(model: torch.nn.Module, flat: dict[str, Any]) -> FamilyInputs | None:
    grid = _video(model, flat, 2)
    if grid is None:
        return None
    n = math.prod(grid)
    embed = getattr(model, "clean_x_embedder", None)
    history = 0
    # `_pack_history_states` packs each history only when its frame indices are given too.
    for latents, indices, conv in (("latents_clean", "indices_latents_clean", "proj"),
                                   ("latents_history_2x", "indices_latents_history_2x", "proj_2x"),
                                   ("latents_history_4x", "indices_latents_history_4x", "proj_4x")):  # fmt: skip
        if flat.get(indices) is not None and embed is not None:
            history += _conv_tokens(flat.get(latents), getattr(embed, conv, None))
    image_prompt = flat.get("image_embeds")
    # "must cat before (not after) encoder_hidden_states": the image prompt's tokens come first.
    before = int(image_prompt.shape[1]) if isinstance(image_prompt, torch.Tensor) and image_prompt.dim() == 3 else 0
    return FamilyInputs(n, grid, streams={history + n: history}, prompt_offset=before)


def _joyimage_edit_plus(model: torch.nn.Module, flat: dict[str, Any]) -> FamilyInputs | None:
    # `hidden_states` (B, max_patches, C, pt, ph, pw); `shape_list[i]` the (t, h, w) of sample i's target image,
    # then of its references, packed in that order and padded to `max_patches`.
    x, shapes = flat.get("hidden_states"), flat.get("shape_list")
    if not isinstance(x, torch.Tensor) or x.dim() != 6 or not shapes:
        return None
    targets = {tuple(int(v) for v in sample[0]) for sample in shapes}
    if len(targets) != 1:
        return FamilyInputs(None, None, note="the samples' target images have different grids")
    t, h, w = targets.pop()
    return FamilyInputs(t * h * w, (t, h, w), streams={int(x.shape[1]): 0})


def _bria_fibo2(model: torch.nn.Module, flat: dict[str, Any]) -> FamilyInputs | None:
    x, text = flat.get("hidden_states"), flat.get("encoder_hidden_states")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not isinstance(text, torch.Tensor) or text.dim() != 4:
        return None
    config = model.config
    p = int(config.patch_size)
    grid = (1, int(x.shape[2]) // p, int(x.shape[3]) // p)
    n = grid[1] * grid[2]
    context = sum((int(c.shape[2]) // p) * (int(c.shape[3]) // p) for c in flat.get("context_latents") or [])
    mask = flat.get("encoder_attention_mask")
    lengths = mask.sum(dim=1).tolist() if isinstance(mask, torch.Tensor) else [int(text.shape[2])] * int(x.shape[0])
    # The gist count per prompt is the model's own function of its text length.
    count = getattr(sys.modules[type(model).__module__], "compute_gist_count", None)
    if count is None:
        return FamilyInputs(n, grid, note="the gist-token count is unknown")
    gists = count(lengths, min_gist=config.min_num_gist_tokens, max_gist=config.max_num_gist_tokens,
                  gist_step=config.gist_step, min_text_len=config.gist_min_text_len,
                  max_text_len=config.gist_max_text_len)  # fmt: skip
    g = max(gists)
    gist_last = min(gists) < g  # a batch that pads gist tokens puts them after the image and context tokens
    return FamilyInputs(n, grid, streams={n + context: 0, g + n + context: 0 if gist_last else g})


_READERS: dict[str, Callable[[torch.nn.Module, dict[str, Any]], FamilyInputs | None]] = {
    "Kandinsky5Transformer3DModel": _kandinsky,
    "Kandinsky6Transformer3DModel": _kandinsky,
    "WanAnimate2Transformer3DModel": _wan_animate2,
    "HunyuanVideoFramepackTransformer3DModel": _framepack,
    "JoyImageEditPlusTransformer3DModel": _joyimage_edit_plus,
    "BriaFibo2Transformer2DModel": _bria_fibo2,
}


def family_inputs(model: torch.nn.Module, flat: dict[str, Any]) -> FamilyInputs | None:
    """The family's own reading of one forward's inputs, or None where the generic reading applies."""
    reader = _READERS.get(type(model).__name__)
    return None if reader is None else reader(model, flat)
