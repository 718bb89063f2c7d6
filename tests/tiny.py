"""Tiny diffusers models built from configs (random weights) and their inputs, for tests and examples."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Inputs = dict[str, Any]


def sd15_unet() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    m = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        sample_size=16, norm_num_groups=8,
    ).eval()  # fmt: skip
    return m, {"sample": torch.randn(2, 4, 16, 16), "timestep": torch.tensor(10),
               "encoder_hidden_states": torch.randn(2, 7, 32)}  # fmt: skip


def sdxl_unet() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    m = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=(2, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 16, use_linear_projection=True, sample_size=16, norm_num_groups=8,
    ).eval()  # fmt: skip
    inputs = {
        "sample": torch.randn(2, 4, 16, 16), "timestep": torch.tensor(10),
        "encoder_hidden_states": torch.randn(2, 7, 32),
        "added_cond_kwargs": {"text_embeds": torch.randn(2, 16), "time_ids": torch.randn(2, 6)},
    }  # fmt: skip
    return m, inputs


def sd3() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    m = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        dual_attention_layers=(0,),
    ).eval()  # fmt: skip
    return m, {"hidden_states": torch.randn(2, 4, 16, 16), "encoder_hidden_states": torch.randn(2, 7, 32),
               "pooled_projections": torch.randn(2, 16), "timestep": torch.tensor([10, 10])}  # fmt: skip


def flux() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    m = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
    ).eval()  # fmt: skip
    h = w = 4
    img_ids = torch.zeros(h * w, 3)
    img_ids[:, 1] = torch.arange(h).repeat_interleave(w)
    img_ids[:, 2] = torch.arange(w).repeat(h)
    return m, {"hidden_states": torch.randn(1, h * w, 8), "encoder_hidden_states": torch.randn(1, 6, 16),
               "pooled_projections": torch.randn(1, 16), "timestep": torch.tensor([0.5]), "img_ids": img_ids,
               "txt_ids": torch.zeros(6, 3), "guidance": None}  # fmt: skip


def pixart() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    m = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, cross_attention_dim=16, caption_channels=32, norm_num_groups=8,
    ).eval()  # fmt: skip
    mask = torch.ones(2, 7)
    mask[1, 4:] = 0  # padded text: the float mask reaches the kernel
    return m, {"hidden_states": torch.randn(2, 4, 8, 8), "encoder_hidden_states": torch.randn(2, 7, 32),
               "encoder_attention_mask": mask, "timestep": torch.tensor([10, 10]),
               "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}  # fmt: skip


def wan(i2v: bool = False) -> tuple[torch.nn.Module, Inputs]:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    kw: dict[str, Any] = {}
    if i2v:
        kw = {"image_dim": 16, "added_kv_proj_dim": 16}
    m = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32, **kw,
    ).eval()  # fmt: skip
    # Wan splits image context off the first (length - 512) tokens: text is padded to 512 tokens.
    inputs = {"hidden_states": torch.randn(1, 4, 2, 8, 8), "timestep": torch.tensor([10]),
              "encoder_hidden_states": torch.randn(1, 512 if i2v else 6, 16)}  # fmt: skip
    if i2v:
        inputs["encoder_hidden_states_image"] = torch.randn(1, 5, 16)
    return m, inputs


def classic_unet() -> tuple[torch.nn.Module, Inputs]:
    """The SD1.5-like UNet with the classic `AttnProcessor` (get_attention_scores + bmm)."""
    from diffusers.models.attention_processor import AttnProcessor

    m, inputs = sd15_unet()
    m.set_attn_processor(AttnProcessor())
    return m, inputs


FAMILIES: dict[str, Callable[[], tuple[torch.nn.Module, Inputs]]] = {
    "sd15": sd15_unet,
    "sdxl": sdxl_unet,
    "sd3": sd3,
    "flux": flux,
    "pixart": pixart,
    "wan_t2v": wan,
    "wan_i2v": lambda: wan(i2v=True),
    "classic": classic_unet,
}


def run(model: torch.nn.Module, inputs: Inputs) -> torch.Tensor:
    """One forward without grad; the first output tensor."""
    with torch.no_grad():
        out = model(**inputs, return_dict=False)
    return out[0]
