"""Token layouts of diffusers models, resolved from the model's own structure.

Three sources:
- where text and image tokens are joined into one sequence, fixed at attach from source: a processor
  that concatenates `encoder_hidden_states` with `hidden_states` (CogVideoX, CogView3+/4, ConsisID:
  joint attention without added projections), or a block or the model concatenating them before the
  attention (single-stream blocks: Flux, Flux2, Chroma, HiDream, HunyuanVideo...), in the order the
  source writes them; Lumina2 writes its joint sequence by index (caption first), stated here;
- the model's inputs, read by a forward pre-hook on the traced model: text lengths (every
  `encoder_hidden_states*` input), the image-token count and grid (frames, h, w) from the latents'
  shape and the config's patch sizes, Flux-style `img_ids`, or LTX-style `num_frames/height/width`;
- the processor's own arguments (hidden states, context) and, in dual-stream processors, the
  `torch.cat` of text and image tokens (caught by the interceptor, `ProcessorInterceptor`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ...core.layout import Layout, grid_for
from ...core.site import Kind
from ...tracing.binding import LayerCall
from ..detect import concat_order, getsource
from .families import family_inputs

__all__ = ["Joining", "ModelInputs", "install_input_hook", "joining", "resolve"]

# Families whose joint sequence is built without a concatenation in source: (model class, site-name
# prefix) -> text first, or None with the reason the layout cannot be known. Lumina2 fills
# `joint_hidden_states[i, :caption_len]` then the image tokens; Z-Image builds one unified sequence per
# sample (image, caption, padding; lengths differ per sample) in `_build_unified_sequence`.
_UNIFIED = "a per-sample unified sequence (image, caption and padding lengths differ per sample)"
_INDEXED_JOINS: dict[tuple[str, str], bool | str] = {
    ("Lumina2Transformer2DModel", "layers."): True,
    ("ZImageTransformer2DModel", "layers."): _UNIFIED,
    ("ZImageControlNetModel", "control_layers."): _UNIFIED,
    ("OmniGenTransformer2DModel", "layers."): "text, image and input-image tokens interleaved in one language-model "
    "sequence (OmniGen)",
}


@dataclass(frozen=True)
class Joining:
    """Where a site's text and image tokens are joined: `processor`, `block`, `model` or `family`;
    `text_first` None when the order cannot be known (`note` says why)."""

    where: str
    text_first: bool | None
    note: str = ""


def joining(name: str, processor: Any, modules: dict[str, torch.nn.Module], root: torch.nn.Module) -> Joining | None:
    """How the site `name` sees text and image tokens joined, from source (None: not joined)."""
    for (cls, prefix), rule in _INDEXED_JOINS.items():
        if type(root).__name__ == cls and name.startswith(prefix):
            return Joining("family", rule) if isinstance(rule, bool) else Joining("family", None, rule)
    order = concat_order(getsource(type(processor).__call__))
    if order is not None:
        return Joining("processor", order)
    parts = name.split(".")
    for n in range(len(parts) - 1, -1, -1):  # the parent block, its parents, up to the model
        ancestor = modules.get(".".join(parts[:n]))
        if ancestor is None or type(ancestor).forward is torch.nn.Module.forward:
            continue
        order = concat_order(getsource(type(ancestor).forward))
        if order is not None:
            return Joining("model" if n == 0 else "block", order)
    return None


@dataclass
class ModelInputs:
    """What the traced model's current forward got: text lengths, image-token count and grid.

    `streams`: where a family packs other tokens (history, references, gist latents) with the generated
    image tokens: latent-stream length -> offset of the image tokens in it (empty: the stream is the image).
    `prompt_offset`: tokens the model puts before the prompt's in the text stream. `note`: why the grid
    is unknown, where the family says.
    """

    text_lens: tuple[int, ...] = ()
    image_len: int | None = None
    grid: tuple[int, int, int] | None = None
    root_hw: tuple[int, int] | None = field(default=None)
    streams: dict[int, int] = field(default_factory=dict)
    prompt_offset: int = 0
    note: str = ""
    family: bool = False


def install_input_hook(model: torch.nn.Module, inputs: ModelInputs) -> Callable[[], None]:
    """Record the model's inputs at each top-level forward; returns the undo."""
    try:
        signature: inspect.Signature | None = inspect.signature(model.forward)
    except (TypeError, ValueError):
        signature = None
    depth = [0]

    def pre(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        depth[0] += 1
        if depth[0] == 1:
            _read(model, signature, args, kwargs, inputs)

    def post(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        depth[0] = max(0, depth[0] - 1)

    hooks = [
        model.register_forward_pre_hook(torch.compiler.disable(pre), with_kwargs=True),
        model.register_forward_hook(torch.compiler.disable(post), always_call=True),
    ]

    def undo() -> None:
        for h in hooks:
            h.remove()

    return undo


def _read(
    model: torch.nn.Module, signature: inspect.Signature | None, args: tuple[Any, ...], kwargs: dict[str, Any],
    inputs: ModelInputs,
) -> None:  # fmt: skip
    flat: dict[str, Any] = dict(kwargs)
    if signature is not None:
        try:
            bound = signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = {}
        for k, v in bound.items():
            if signature.parameters[k].kind is inspect.Parameter.VAR_KEYWORD:
                flat.update(v)
            else:
                flat[k] = v
    texts = []
    for k, v in flat.items():
        # The text encoders' outputs (`encoder_hidden_states`, `encoder_hidden_states_t5`...), not image or
        # audio conditioning passed under a similar name (`encoder_hidden_states_image`, `audio_encoder_...`).
        text = k.startswith("encoder_hidden_states") and "image" not in k and "audio" not in k
        if text and isinstance(v, torch.Tensor) and v.dim() >= 3:
            texts.append(int(v.shape[-2]))
    inputs.text_lens = tuple(texts)
    x = flat.get("hidden_states", flat.get("sample"))
    inputs.image_len, inputs.grid = _image_tokens(model, x, flat) if isinstance(x, torch.Tensor) else (None, None)
    inputs.root_hw = (int(x.shape[-2]), int(x.shape[-1])) if isinstance(x, torch.Tensor) and x.dim() >= 4 else None
    family = family_inputs(model, flat)
    inputs.streams, inputs.prompt_offset, inputs.note, inputs.family = {}, 0, "", family is not None
    if family is not None:
        inputs.image_len, inputs.grid, inputs.root_hw = family.image_len, family.grid, None
        inputs.streams, inputs.prompt_offset, inputs.note = family.streams, family.prompt_offset, family.note


def _image_tokens(
    model: torch.nn.Module, x: torch.Tensor, flat: dict[str, Any]
) -> tuple[int | None, tuple[int, int, int] | None]:
    config = getattr(model, "config", None)
    p = getattr(config, "patch_size", None)
    pt = getattr(config, "patch_size_t", None)
    if isinstance(p, (tuple, list)):
        pt, ph, pw = (p if len(p) == 3 else (pt, *p[-2:]))
    else:
        ph = pw = p
    if x.dim() == 3:  # packed latents (B, L, C): the grid from position ids or frame/height/width inputs
        n = int(x.shape[1])
        ids = flat.get("img_ids")
        if isinstance(ids, torch.Tensor) and ids.dim() >= 2 and ids.shape[-2] == n and ids.shape[-1] >= 3:
            cols = ids.reshape(-1, n, ids.shape[-1])[0]
            counts = tuple(int(torch.unique(cols[:, c]).numel()) for c in range(3))
            if counts[0] * counts[1] * counts[2] == n:
                return n, counts  # type: ignore[return-value]
        fhw = tuple(flat.get(k) for k in ("num_frames", "height", "width"))
        if all(isinstance(v, int) for v in fhw) and fhw[0] * fhw[1] * fhw[2] == n:  # type: ignore[operator]
            return n, fhw  # type: ignore[return-value]
        return n, None
    if not isinstance(ph, int) or not isinstance(pw, int):
        return None, None  # no patch embedding (UNets): grids come from each processor's own input
    if x.dim() == 4:
        h, w = int(x.shape[-2]) // ph, int(x.shape[-1]) // pw
        return h * w, (1, h, w)
    if x.dim() == 5:
        channels = getattr(config, "in_channels", None)
        if x.shape[1] == channels:  # (B, C, F, H, W)
            frames = int(x.shape[2])
        elif x.shape[2] == channels:  # (B, F, C, H, W): CogVideoX
            frames = int(x.shape[1])
        else:
            return None, None
        f = frames // (pt if isinstance(pt, int) and pt > 0 else 1)
        h, w = int(x.shape[-2]) // ph, int(x.shape[-1]) // pw
        return f * h * w, (f, h, w)
    return None, None


Grid = tuple[int, int, int]


def _grid(layer: LayerCall, inputs: ModelInputs, n: int, root_hw: tuple[int, int] | None) -> Grid | None:
    if inputs.grid is not None and inputs.image_len == n:
        return inputs.grid
    hw = layer.image_hw
    if hw is None or hw[0] * hw[1] != n:
        hw = grid_for(n, inputs.root_hw or root_hw)
    return None if hw is None else (1, *hw)


def _image_in(
    stream: slice, layer: LayerCall, inputs: ModelInputs, root_hw: tuple[int, int] | None
) -> tuple[slice | None, Grid | None]:
    """The generated image tokens among the latent-stream tokens at `stream`, and their grid. A family that
    packs other tokens with them says where they sit (`ModelInputs.streams`); a stream it does not name
    (Perceiver latents, a text refiner's tokens) holds no image tokens."""
    length = stream.stop - stream.start
    if not inputs.family:
        return stream, _grid(layer, inputs, length, root_hw)
    n = inputs.image_len
    offset = inputs.streams.get(length, 0 if length == n else None)
    if offset is None or n is None:
        return None, None
    return slice(stream.start + offset, stream.start + offset + n), inputs.grid


def resolve(
    site_kind: Kind,
    join: Joining | None,
    layer: LayerCall,
    inputs: ModelInputs,
    q_len: int,
    k_len: int,
    seen_text_first: bool | None,
    root_hw: tuple[int, int] | None,
) -> Layout:
    """The layout of one kernel call with `q_len` queries and `k_len` keys at a processor site."""
    t_proc, i_proc = layer.text_len, layer.image_len
    note = inputs.note if inputs.family and inputs.grid is None else ""
    if site_kind == "linear":
        image, grid = _image_in(slice(0, q_len), layer, inputs, root_hw)
        return Layout("linear", image=image, grid=grid, note=note)
    if t_proc and i_proc and q_len == k_len == t_proc + i_proc:
        # Both streams handed to the processor, joined inside it (dual-stream blocks, CogVideoX...).
        order = seen_text_first if seen_text_first is not None else (join.text_first if join else None)
        if order is None:
            return Layout("joint", known=False, note="the order of text and image tokens is unknown")
        stream = slice(t_proc, q_len) if order else slice(0, i_proc)
        image, grid = _image_in(stream, layer, inputs, root_hw)
        return Layout("joint", text=_text_part(order, stream, t_proc, q_len, inputs), image=image, grid=grid,
                      note=note)  # fmt: skip
    if site_kind == "cross" or (t_proc is not None and k_len != q_len):
        # Keys are the text when their count is a text input's (the model's own inputs say so), else, for
        # models whose inputs name no text, when they are the processor's context.
        text: slice | None = slice(0, k_len)
        latent_keys = k_len in (inputs.image_len, *inputs.streams) and k_len not in inputs.text_lens
        if inputs.family and k_len != q_len and latent_keys:  # Kandinsky 6's audio queries on the video tokens
            image, grid = _image_in(slice(0, q_len), layer, inputs, root_hw)
            return Layout("cross", image=image, grid=grid, note="keys are the image tokens")
        if inputs.text_lens and k_len - q_len in inputs.text_lens and k_len not in inputs.text_lens:
            # Keys are the image tokens and the text joined inside the processor (PRX, NucleusMoE): the
            # processor's names for them are not ones the order rule reads.
            return Layout("cross", known=False, note=f"keys are the {q_len} image tokens and {k_len - q_len} text "
                          "tokens joined in the processor, in an order attntrace does not read")  # fmt: skip
        if inputs.text_lens and k_len not in inputs.text_lens:
            t = inputs.text_lens[0]
            if t == t_proc or t_proc is None or t > k_len:
                text, note = None, "keys are not the text (an image-context call)"
            else:  # the model appended conditioning tokens to the prompt's (I2VGenXL, IP-Adapter image embeds)
                text, note = slice(0, t), f"keys: the prompt's {t} tokens, then {k_len - t} conditioning tokens"
        elif not inputs.text_lens and t_proc is not None and k_len != t_proc:
            text, note = None, "keys are not the text (an image-context call)"
        image, grid = _image_in(slice(0, q_len), layer, inputs, root_hw)
        return Layout("cross", text=text, image=image, grid=grid, note=note)
    if join is not None and join.where != "processor" and q_len == k_len:
        return _single_stream(join, layer, inputs, q_len, root_hw)
    image, grid = _image_in(slice(0, q_len), layer, inputs, root_hw)
    return Layout("self", image=image, grid=grid, note=note)


def _single_stream(
    join: Joining, layer: LayerCall, inputs: ModelInputs, length: int, root_hw: tuple[int, int] | None
) -> Layout:
    """A block that gets text and image tokens already joined: the image count comes from the model's
    inputs, the order from the source that joined them, the text from what remains."""
    i = inputs.image_len
    if inputs.streams:  # the latent stream holds other tokens too: its length is the family's
        i = max((s for s in inputs.streams if s <= length), default=None)
    if i == length:
        image, grid = _image_in(slice(0, length), layer, inputs, root_hw)
        return Layout("self", image=image, grid=grid)
    if join.text_first is None:
        return Layout("joint", known=False, note=join.note or "the order of text and image tokens is unknown")
    if i is None or i > length:
        return Layout("joint", known=False, note=f"{length} tokens, and the model's image-token count is unknown")
    stream = slice(length - i, length) if join.text_first else slice(0, i)
    text = _text_part(join.text_first, stream, length - i, length, inputs)
    image, grid = _image_in(stream, layer, inputs, root_hw)
    return Layout("joint", text=text, image=image, grid=grid)


def _text_part(text_first: bool, image: slice, n_text: int, length: int, inputs: ModelInputs) -> slice:
    """The prompt's tokens among the `n_text` non-image tokens: all of them, or, when the model adds
    tokens of its own to the text stream (AuraFlow's registers, a ControlNet's mode token: before the
    prompt; a second encoder's tokens: after it; Framepack's image prompt: before it, by the family's
    word), the model's first text input's tokens."""
    t = inputs.text_lens[0] if inputs.text_lens else None
    start = 0 if text_first else image.stop
    if inputs.prompt_offset:
        first = start + inputs.prompt_offset
        return slice(first, start + n_text if t is None else min(start + n_text, first + t))
    if t is None or t >= n_text:
        return slice(start, start + n_text)
    return slice(start + n_text - t, start + n_text) if text_first else slice(start, start + t)
