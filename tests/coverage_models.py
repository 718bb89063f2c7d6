# ruff: noqa: E501  (a table of configs: one model per line reads best)
"""Tiny builders for diffusers model classes with attention, plus class discovery (tests only).

`CASES` maps a diffusers class name to a builder returning `(model, forward kwargs)`; every model
is built from a config written here (no hub) with tiny dims. `discover()` lists every `ModelMixin`
subclass exported by `diffusers` and how many attention sites (modules holding a `processor`) a
default-config instance has, built on the meta device so nothing is allocated.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch

from tests import tiny

Inputs = dict[str, Any]
Builder = Callable[[], tuple[torch.nn.Module, Inputs]]


def _has_processor(module: torch.nn.Module) -> bool:
    # Independent of attntrace's own rule: any module holding a processor object.
    return getattr(module, "processor", None) is not None


def discover() -> dict[str, int | str]:
    """Every ModelMixin subclass exported by diffusers -> number of attention sites at default config,
    or the reason a default instance could not be built (then the class may still have attention)."""
    import diffusers
    from diffusers import ModelMixin

    out: dict[str, int | str] = {}
    for name in sorted(dir(diffusers)):
        try:
            obj = getattr(diffusers, name)
        except Exception:  # lazy import of an optional backend failed
            continue
        if not (inspect.isclass(obj) and issubclass(obj, ModelMixin) and obj is not ModelMixin):
            continue
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                model = obj()
            out[name] = sum(1 for m in model.modules() if _has_processor(m))
        except Exception as exc:
            out[name] = f"default config does not build: {type(exc).__name__}: {str(exc)[:70]}"
    return out


def _seed() -> None:
    torch.manual_seed(0)


def unet2d() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import UNet2DModel

    _seed()
    m = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=8,
    ).eval()  # fmt: skip
    return m, {"sample": torch.randn(2, 3, 16, 16), "timestep": torch.tensor(10)}


def vq() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import VQModel

    _seed()
    m = VQModel(
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, num_vq_embeddings=16,
        vq_embed_dim=4,
    ).eval()  # fmt: skip
    return m, {"sample": torch.randn(1, 3, 16, 16)}


def autoencoder_kl() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import AutoencoderKL

    _seed()
    m = AutoencoderKL(
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
    ).eval()  # fmt: skip
    return m, {"sample": torch.randn(1, 3, 16, 16)}


def asym_kl() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import AsymmetricAutoencoderKL

    _seed()
    m = AsymmetricAutoencoderKL(
        down_block_out_channels=(16, 32), up_block_out_channels=(16, 32), layers_per_down_block=1,
        layers_per_up_block=1, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()  # fmt: skip
    return m, {"sample": torch.randn(1, 3, 16, 16)}


def dit() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import DiTTransformer2DModel

    _seed()
    m = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_num_groups=8,
    ).eval()  # fmt: skip
    return m, {"hidden_states": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([3, 3]),
               "class_labels": torch.tensor([1, 2])}  # fmt: skip


def transformer2d() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import Transformer2DModel

    _seed()
    m = Transformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=8, num_layers=1, cross_attention_dim=16,
        norm_num_groups=8,
    ).eval()  # fmt: skip
    return m, {"hidden_states": torch.randn(2, 8, 4, 4), "encoder_hidden_states": torch.randn(2, 5, 16)}


def sana() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import SanaTransformer2DModel

    _seed()
    m = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=8, patch_size=1,
    ).eval()  # fmt: skip
    return m, {"hidden_states": torch.randn(2, 4, 8, 8), "encoder_hidden_states": torch.randn(2, 5, 16),
               "timestep": torch.tensor([3, 3])}  # fmt: skip


def controlnet() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import ControlNetModel

    _seed()
    m = ControlNetModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), conditioning_embedding_out_channels=(8, 16),
        norm_num_groups=8,
    ).eval()  # fmt: skip
    return m, {"sample": torch.randn(2, 4, 16, 16), "timestep": torch.tensor(10),
               "encoder_hidden_states": torch.randn(2, 7, 32), "controlnet_cond": torch.randn(2, 3, 32, 32)}  # fmt: skip


def sd3_controlnet() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import SD3ControlNetModel

    _seed()
    m = SD3ControlNetModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
    ).eval()  # fmt: skip
    return m, {"hidden_states": torch.randn(2, 4, 16, 16), "controlnet_cond": torch.randn(2, 4, 16, 16),
               "encoder_hidden_states": torch.randn(2, 7, 32), "pooled_projections": torch.randn(2, 16),
               "timestep": torch.tensor([10, 10])}  # fmt: skip


def flux_controlnet() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import FluxControlNetModel

    _, inputs = tiny.flux()
    _seed()
    m = FluxControlNetModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
    ).eval()  # fmt: skip
    inputs = dict(inputs, controlnet_cond=torch.randn(1, 16, 8))
    return m, inputs


def prior() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import PriorTransformer

    _seed()
    m = PriorTransformer(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=16,
                         num_embeddings=5, additional_embeddings=4).eval()  # fmt: skip
    return m, {"hidden_states": torch.randn(2, 16), "timestep": 3, "proj_embedding": torch.randn(2, 16),
               "encoder_hidden_states": torch.randn(2, 5, 16), "attention_mask": torch.ones(2, 5)}  # fmt: skip


def auraflow() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import AuraFlowTransformer2DModel

    _seed()
    m = AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        out_channels=4, pos_embed_max_size=64,
    ).eval()  # fmt: skip
    return m, {"hidden_states": torch.randn(2, 4, 8, 8), "encoder_hidden_states": torch.randn(2, 5, 16),
               "timestep": torch.tensor([3, 3])}  # fmt: skip


def cogvideox() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import CogVideoXTransformer3DModel

    _seed()
    m = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=1, sample_width=8, sample_height=8, sample_frames=2, patch_size=2,
        temporal_compression_ratio=1, max_text_seq_length=5,
    ).eval()  # fmt: skip
    return m, {"hidden_states": torch.randn(1, 2, 4, 8, 8), "encoder_hidden_states": torch.randn(1, 5, 16),
               "timestep": torch.tensor([3])}  # fmt: skip


def hunyuan_dit() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import HunyuanDiT2DModel

    _seed()
    m = HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, num_layers=2, sample_size=8,
        cross_attention_dim=16, cross_attention_dim_t5=16, pooled_projection_dim=8, hidden_size=16,
        text_len=5, text_len_t5=5, use_style_cond_and_image_meta_size=False,
    ).eval()  # fmt: skip
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    rope = get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4))
    return m, {"hidden_states": torch.randn(1, 4, 8, 8), "timestep": torch.tensor([3.0]),
               "encoder_hidden_states": torch.randn(1, 5, 16), "text_embedding_mask": torch.ones(1, 5),
               "encoder_hidden_states_t5": torch.randn(1, 5, 16), "text_embedding_mask_t5": torch.ones(1, 5),
               "image_meta_size": None, "style": None, "image_rotary_emb": rope}  # fmt: skip


def ltx() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import LTXVideoTransformer3DModel

    _seed()
    m = LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=1, caption_channels=16,
    ).eval()  # fmt: skip
    return m, {"hidden_states": torch.randn(1, 2 * 4 * 4, 4), "encoder_hidden_states": torch.randn(1, 5, 16),
               "timestep": torch.tensor([3]), "encoder_attention_mask": torch.ones(1, 5), "num_frames": 2,
               "height": 4, "width": 4}  # fmt: skip


def unet3d() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import UNet3DConditionModel

    _seed()
    m = UNet3DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=16, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        norm_num_groups=8, sample_size=8,
    ).eval()  # fmt: skip
    return m, {"sample": torch.randn(1, 4, 2, 8, 8), "timestep": torch.tensor(3),
               "encoder_hidden_states": torch.randn(1, 5, 16)}  # fmt: skip


def lumina2() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import Lumina2Transformer2DModel

    _seed()
    m = Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=1, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=2, multiple_of=8, cap_feat_dim=16, axes_dim_rope=(4, 2, 2),
        axes_lens=(32, 32, 32),
    ).eval()  # fmt: skip
    return m, {"hidden_states": torch.randn(1, 4, 8, 8), "timestep": torch.tensor([0.5]),
               "encoder_hidden_states": torch.randn(1, 5, 16),
               "encoder_attention_mask": torch.ones(1, 5, dtype=torch.bool)}  # fmt: skip


def _img_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h * w, 3)
    ids[:, 1] = torch.arange(h).repeat_interleave(w)
    ids[:, 2] = torch.arange(w).repeat(h)
    return ids


def mochi() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import MochiTransformer3DModel

    _seed()
    m = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
                                in_channels=4, text_embed_dim=16, time_embed_dim=4, max_sequence_length=8).eval()  # fmt: skip
    return m, {"hidden_states": torch.randn(1, 4, 2, 8, 8), "encoder_hidden_states": torch.randn(1, 5, 16),
               "timestep": torch.tensor([3]), "encoder_attention_mask": torch.ones(1, 5, dtype=torch.bool)}  # fmt: skip


def latte() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import LatteTransformer3DModel

    _seed()
    m = LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                                cross_attention_dim=16, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                                norm_type="ada_norm_single", caption_channels=16, video_length=2).eval()  # fmt: skip
    return m, {"hidden_states": torch.randn(1, 4, 2, 8, 8), "encoder_hidden_states": torch.randn(1, 5, 16),
               "timestep": torch.tensor([3]), "enable_temporal_attentions": True}  # fmt: skip


def allegro() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import AllegroTransformer3DModel

    _seed()
    m = AllegroTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1,
                                  cross_attention_dim=16, sample_height=8, sample_width=8, sample_frames=2,
                                  caption_channels=16).eval()  # fmt: skip
    return m, {"hidden_states": torch.randn(1, 4, 2, 8, 8), "encoder_hidden_states": torch.randn(1, 5, 16),
               "timestep": torch.tensor([3])}  # fmt: skip


def hunyuan_video() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import HunyuanVideoTransformer3DModel

    _seed()
    m = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                                       num_single_layers=1, num_refiner_layers=1, patch_size=1, text_embed_dim=16,
                                       pooled_projection_dim=8, rope_axes_dim=(2, 2, 4)).eval()  # fmt: skip
    return m, {"hidden_states": torch.randn(1, 4, 1, 4, 4), "timestep": torch.tensor([3]),
               "encoder_hidden_states": torch.randn(1, 5, 16), "encoder_attention_mask": torch.ones(1, 5),
               "pooled_projections": torch.randn(1, 8), "guidance": torch.tensor([3.0])}  # fmt: skip


def cogview3() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import CogView3PlusTransformer2DModel

    _seed()
    m = CogView3PlusTransformer2DModel(patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                       out_channels=4, text_embed_dim=16, time_embed_dim=8, condition_dim=2,
                                       pos_embed_max_size=8, sample_size=8).eval()  # fmt: skip
    hw = torch.tensor([[8.0, 8.0]])
    return m, {"hidden_states": torch.randn(1, 4, 8, 8), "encoder_hidden_states": torch.randn(1, 5, 16),
               "timestep": torch.tensor([3]), "original_size": hw, "target_size": hw, "crop_coords": hw * 0}  # fmt: skip


def cogview4() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import CogView4Transformer2DModel

    _seed()
    m = CogView4Transformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
                                   num_attention_heads=2, text_embed_dim=16, time_embed_dim=8, condition_dim=2,
                                   pos_embed_max_size=8, sample_size=8, rope_axes_dim=(4, 4)).eval()  # fmt: skip
    hw = torch.tensor([[8.0, 8.0]])
    return m, {"hidden_states": torch.randn(1, 4, 8, 8), "encoder_hidden_states": torch.randn(1, 5, 16),
               "timestep": torch.tensor([3]), "original_size": hw, "target_size": hw, "crop_coords": hw * 0}  # fmt: skip


def qwen_image() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import QwenImageTransformer2DModel

    _seed()
    m = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=8,
                                    num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4)).eval()  # fmt: skip
    return m, {"hidden_states": torch.randn(1, 16, 16), "encoder_hidden_states": torch.randn(1, 5, 16),
               "encoder_hidden_states_mask": torch.ones(1, 5), "timestep": torch.tensor([0.5]),
               "img_shapes": [(1, 4, 4)]}  # fmt: skip


def chroma() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import ChromaTransformer2DModel

    _seed()
    m = ChromaTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4),
                                 approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1).eval()  # fmt: skip
    return m, {"hidden_states": torch.randn(1, 16, 8), "encoder_hidden_states": torch.randn(1, 6, 16),
               "timestep": torch.tensor([0.5]), "img_ids": _img_ids(4, 4), "txt_ids": torch.zeros(6, 3)}  # fmt: skip


def skyreels() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import SkyReelsV2Transformer3DModel

    _seed()
    m = SkyReelsV2Transformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
                                     freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32).eval()  # fmt: skip
    return m, {"hidden_states": torch.randn(1, 4, 2, 8, 8), "timestep": torch.tensor([10]),
               "encoder_hidden_states": torch.randn(1, 6, 16)}  # fmt: skip


def stable_audio() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import StableAudioDiTModel

    _seed()
    m = StableAudioDiTModel(sample_size=8, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
                            num_key_value_attention_heads=1, out_channels=4, cross_attention_dim=16, time_proj_dim=8,
                            global_states_input_dim=16, cross_attention_input_dim=16).eval()  # fmt: skip
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    rope = get_1d_rotary_pos_embed(4, 8 + 1, use_real=True, repeat_interleave_real=False)
    return m, {"hidden_states": torch.randn(1, 4, 8), "timestep": torch.tensor([3]),
               "encoder_hidden_states": torch.randn(1, 5, 16), "global_hidden_states": torch.randn(1, 1, 16),
               "rotary_embedding": rope}  # fmt: skip


def sana_controlnet() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import SanaControlNetModel

    _seed()
    m = SanaControlNetModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                            caption_channels=16, sample_size=8).eval()  # fmt: skip
    return m, {"hidden_states": torch.randn(2, 4, 8, 8), "encoder_hidden_states": torch.randn(2, 5, 16),
               "timestep": torch.tensor([3, 3]), "controlnet_cond": torch.randn(2, 4, 8, 8)}  # fmt: skip


def temporal_decoder_vae() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import AutoencoderKLTemporalDecoder

    _seed()
    m = AutoencoderKLTemporalDecoder(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                     latent_channels=4, layers_per_block=1).eval()  # fmt: skip
    return m, {"sample": torch.randn(2, 3, 16, 16), "num_frames": 2}


def flux2_vae() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import AutoencoderKLFlux2

    _seed()
    m = AutoencoderKLFlux2(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                           norm_num_groups=8).eval()  # fmt: skip
    return m, {"sample": torch.randn(1, 3, 16, 16)}


def unet_motion() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import UNetMotionModel

    _seed()
    m = UNetMotionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=16, norm_num_groups=8,
                        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
                        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
                        motion_num_attention_heads=2, num_attention_heads=2, motion_max_seq_length=4).eval()  # fmt: skip
    return m, {"sample": torch.randn(1, 4, 2, 8, 8), "timestep": torch.tensor(3),
               "encoder_hidden_states": torch.randn(2, 5, 16)}  # fmt: skip


def transformer_temporal() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import TransformerTemporalModel

    _seed()
    m = TransformerTemporalModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, num_layers=1,
                                 norm_num_groups=8).eval()  # fmt: skip
    return m, {"hidden_states": torch.randn(2, 16, 4, 4), "num_frames": 2}


def unet_svd() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import UNetSpatioTemporalConditionModel

    _seed()
    m = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=16, num_attention_heads=(2, 4),
        in_channels=8, out_channels=4, addition_time_embed_dim=4, projection_class_embeddings_input_dim=12,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    ).eval()  # fmt: skip
    return m, {"sample": torch.randn(1, 2, 8, 8, 8), "timestep": torch.tensor(3),
               "encoder_hidden_states": torch.randn(1, 1, 16), "added_time_ids": torch.randn(1, 3)}  # fmt: skip


def _flux_like(cls_name: str, **extra: Any) -> tuple[torch.nn.Module, Inputs]:
    import diffusers

    _seed()
    m = getattr(diffusers, cls_name)(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                     num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4), **extra).eval()  # fmt: skip
    inputs: Inputs = {"hidden_states": torch.randn(1, 16, 8), "encoder_hidden_states": torch.randn(1, 6, 16),
                      "timestep": torch.tensor([0.5]), "img_ids": _img_ids(4, 4), "txt_ids": torch.zeros(6, 3)}  # fmt: skip
    return m, inputs


def bria() -> tuple[torch.nn.Module, Inputs]:
    return _flux_like("BriaTransformer2DModel")


def ovis() -> tuple[torch.nn.Module, Inputs]:
    return _flux_like("OvisImageTransformer2DModel", out_channels=8)


def longcat() -> tuple[torch.nn.Module, Inputs]:
    m, inputs = _flux_like("LongCatImageTransformer2DModel", pooled_projection_dim=16)
    return m, inputs


def flux2() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import Flux2Transformer2DModel

    _seed()
    m = Flux2Transformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=8,
                                axes_dims_rope=(2, 2, 2, 2), guidance_embeds=False).eval()  # fmt: skip
    img_ids = torch.zeros(16, 4)
    img_ids[:, 1] = torch.arange(4).repeat_interleave(4)
    img_ids[:, 2] = torch.arange(4).repeat(4)
    return m, {"hidden_states": torch.randn(1, 16, 8), "encoder_hidden_states": torch.randn(1, 6, 16),
               "timestep": torch.tensor([0.5]), "img_ids": img_ids[None], "txt_ids": torch.zeros(1, 6, 4)}  # fmt: skip


def wan_vace() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import WanVACETransformer3DModel

    _seed()
    m = WanVACETransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
                                  vace_layers=[0], vace_in_channels=4).eval()  # fmt: skip
    return m, {"hidden_states": torch.randn(1, 4, 2, 8, 8), "timestep": torch.tensor([10]),
               "encoder_hidden_states": torch.randn(1, 6, 16), "control_hidden_states": torch.randn(1, 4, 2, 8, 8)}  # fmt: skip


def i2vgen() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import I2VGenXLUNet

    _seed()
    m = I2VGenXLUNet(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=16, norm_num_groups=8,
                     down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
                     attention_head_dim=8, num_attention_heads=None, sample_size=8).eval()  # fmt: skip
    return m, {"sample": torch.randn(1, 4, 2, 8, 8), "timestep": torch.tensor(3), "fps": torch.tensor([8]),
               "image_latents": torch.randn(1, 4, 2, 8, 8), "image_embeddings": torch.randn(1, 16),
               "encoder_hidden_states": torch.randn(1, 5, 16)}  # fmt: skip


def qwen_controlnet() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import QwenImageControlNetModel

    _, inputs = qwen_image()
    _seed()
    m = QwenImageControlNetModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4)).eval()  # fmt: skip
    return m, dict(inputs, controlnet_cond=torch.randn(1, 16, 16))


def chronoedit() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import ChronoEditTransformer3DModel

    _seed()
    m = ChronoEditTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                     out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1,
                                     rope_max_seq_len=32).eval()  # fmt: skip
    return m, {"hidden_states": torch.randn(1, 4, 2, 8, 8), "timestep": torch.tensor([10]),
               "encoder_hidden_states": torch.randn(1, 6, 16)}  # fmt: skip


def controlnet_xs() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import UNetControlNetXSModel

    _seed()
    m = UNetControlNetXSModel(sample_size=16, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64),
                              norm_num_groups=8, cross_attention_dim=16, transformer_layers_per_block=1,
                              num_attention_heads=2, ctrl_block_out_channels=(4, 8), ctrl_num_attention_heads=2,
                              ctrl_conditioning_embedding_out_channels=(8, 16),
                              time_cond_proj_dim=None, ctrl_max_norm_num_groups=2).eval()  # fmt: skip
    return m, {"sample": torch.randn(1, 4, 16, 16), "timestep": torch.tensor(3),
               "encoder_hidden_states": torch.randn(1, 5, 16), "controlnet_cond": torch.randn(1, 3, 32, 32)}  # fmt: skip


def hunyuan_dit_controlnet() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import HunyuanDiT2DControlNetModel

    _, inputs = hunyuan_dit()
    _seed()
    m = HunyuanDiT2DControlNetModel(
        conditioning_channels=4, num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2,
        transformer_num_layers=4, sample_size=8, cross_attention_dim=16, cross_attention_dim_t5=16,
        pooled_projection_dim=8, hidden_size=16, text_len=5, text_len_t5=5, use_style_cond_and_image_meta_size=False,
    ).eval()  # fmt: skip
    return m, dict(inputs, controlnet_cond=torch.randn(1, 4, 8, 8))


def consisid() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import ConsisIDTransformer3DModel

    _seed()
    m = ConsisIDTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=1, sample_width=8, sample_height=8, sample_frames=2, patch_size=2,
        temporal_compression_ratio=1, max_text_seq_length=5, is_train_face=False,
    ).eval()  # fmt: skip
    return m, {"hidden_states": torch.randn(1, 2, 4, 8, 8), "encoder_hidden_states": torch.randn(1, 5, 16),
               "timestep": torch.tensor([3])}  # fmt: skip


# ---- more classes (configs as small as the class allows; inputs matching them) ----


def _mk(cls_name: str, **config: Any) -> torch.nn.Module:
    import diffusers

    _seed()
    return getattr(diffusers, cls_name)(**config).eval()


def _r(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def hidream() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("HiDreamImageTransformer2DModel", patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1,
            attention_head_dim=8, num_attention_heads=2, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2,
            num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(16, 16), llama_layers=(0, 1),
            force_inference_output=True)  # fmt: skip
    return m, {"hidden_states": _r(1, 4, 8, 8), "encoder_hidden_states_t5": _r(1, 4, 8),
               "encoder_hidden_states_llama3": _r(2, 1, 4, 4), "pooled_embeds": _r(1, 8), "timesteps": torch.tensor([3])}  # fmt: skip


def omnigen() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("OmniGenTransformer2DModel", hidden_size=16, num_attention_heads=2, num_key_value_heads=2, intermediate_size=32,
            num_layers=2, pad_token_id=0, vocab_size=100, in_channels=4, time_step_dim=4,
            rope_scaling={"long_factor": [1, 2, 3, 4], "short_factor": [1, 2, 3, 4]})  # fmt: skip
    n = 20 + 1 + 16
    return m, {"hidden_states": _r(1, 4, 8, 8), "timestep": torch.tensor([0.5]), "input_ids": torch.randint(0, 10, (1, 20)),
               "input_img_latents": [_r(1, 4, 8, 8)], "input_image_sizes": {0: [[0, 16]]},
               "attention_mask": torch.ones(1, n, n), "position_ids": torch.arange(n)[None]}  # fmt: skip


def lumina_next() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("LuminaNextDiT2DModel", sample_size=8, patch_size=2, in_channels=4, hidden_size=24, num_layers=1,
            num_attention_heads=3, num_kv_heads=1, multiple_of=16, learn_sigma=False, qk_norm=True,
            cross_attention_dim=16)  # fmt: skip
    mask = torch.ones(1, 5)
    mask[:, -1] = 0  # one padded text token: the masked path runs too
    return m, {"hidden_states": _r(1, 4, 8, 8), "encoder_hidden_states": _r(1, 5, 16), "timestep": torch.tensor([0.5]),
               "encoder_mask": mask, "image_rotary_emb": _r(16, 16, 4), "cross_attention_kwargs": {}}  # fmt: skip


def easyanimate() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("EasyAnimateTransformer3DModel", attention_head_dim=16, num_attention_heads=2, in_channels=4, mmdit_layers=1,
            num_layers=1, out_channels=4, patch_size=2, sample_height=8, sample_width=8, text_embed_dim=16,
            time_embed_dim=8)  # fmt: skip
    return m, {"hidden_states": _r(1, 4, 2, 8, 8), "timestep": torch.tensor([3]), "encoder_hidden_states": _r(1, 5, 16)}


def cosmos() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("CosmosTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
            num_layers=1, mlp_ratio=2, text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 16, 16), patch_size=(1, 2, 2),
            rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False, extra_pos_embed_type="learnable")  # fmt: skip
    # concat_padding_mask=False: the padding-mask path needs torchvision, which is not a test dependency
    return m, {"hidden_states": _r(1, 4, 1, 8, 8), "timestep": torch.tensor([3]), "encoder_hidden_states": _r(1, 5, 16),
               "attention_mask": torch.ones(1, 5), "fps": 30}  # fmt: skip


def stable_cascade() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("StableCascadeUNet", in_channels=4, out_channels=4, timestep_ratio_embedding_dim=8, conditioning_dim=16,
            block_out_channels=(16, 32), num_attention_heads=(2, 2), down_num_layers_per_block=(1, 1),
            up_num_layers_per_block=(1, 1), clip_text_pooled_in_channels=8, clip_text_in_channels=8, clip_seq=2,
            dropout=(0.0, 0.0))  # fmt: skip
    return m, {"sample": _r(1, 4, 8, 8), "timestep_ratio": torch.tensor([0.5]), "clip_text_pooled": _r(1, 1, 8),
               "clip_text": _r(1, 5, 8)}  # fmt: skip


def uvit2d() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("UVit2DModel", hidden_size=16, cond_embed_dim=8, micro_cond_encode_dim=2, micro_cond_embed_dim=10,
            encoder_hidden_size=8, vocab_size=32, codebook_size=8, in_channels=8, block_out_channels=16, num_res_blocks=1,
            downsample=True, upsample=True, block_num_heads=2, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=16, sample_size=4)  # fmt: skip
    return m, {"input_ids": torch.randint(0, 8, (1, 4, 4)), "encoder_hidden_states": _r(1, 5, 8),
               "pooled_text_emb": _r(1, 8), "micro_conds": _r(1, 5)}  # fmt: skip


def kandinsky3() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("Kandinsky3UNet", in_channels=4, time_embedding_dim=4, groups=2, attention_head_dim=4, layers_per_block=2,
            block_out_channels=(16, 32), cross_attention_dim=4, encoder_hid_dim=16)  # fmt: skip
    mask = torch.ones(1, 5)
    mask[:, -1] = 0
    return m, {"sample": _r(1, 4, 8, 8), "timestep": torch.tensor([3]), "encoder_hidden_states": _r(1, 5, 16),
               "encoder_attention_mask": mask}  # fmt: skip


def sparse_controlnet() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("SparseControlNetModel", in_channels=4, conditioning_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"), norm_num_groups=8, cross_attention_dim=16,
            attention_head_dim=8, conditioning_embedding_out_channels=(8, 16), motion_max_seq_length=4,
            motion_num_attention_heads=2)  # fmt: skip
    return m, {"sample": _r(1, 4, 2, 8, 8), "timestep": torch.tensor(3), "encoder_hidden_states": _r(2, 5, 16),
               "controlnet_cond": _r(1, 4, 2, 8, 8), "conditioning_mask": torch.ones(1, 1, 2, 8, 8)}  # fmt: skip


def t5_film() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("T5FilmDecoder", input_dims=4, targets_length=8, d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32,
            dropout_rate=0.0)  # fmt: skip
    mask = torch.ones(1, 5, dtype=torch.bool)
    mask[:, -1] = False
    return m, {"encodings_and_masks": [(_r(1, 5, 16), mask)], "decoder_input_tokens": _r(1, 8, 4),
               "decoder_noise_time": torch.tensor([0.5])}  # fmt: skip


def sana_video() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("SanaVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
            num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24,
            caption_channels=16, mlp_ratio=2.5, sample_size=8, patch_size=(1, 2, 2), norm_elementwise_affine=False,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)  # fmt: skip
    return m, {"hidden_states": _r(1, 4, 2, 8, 8), "encoder_hidden_states": _r(1, 5, 16), "timestep": torch.tensor([3])}


def wan_animate() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("WanAnimateTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
            in_channels=12, latent_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", image_dim=16, rope_max_seq_len=32,
            motion_encoder_channel_sizes={"4": 8, "8": 8, "16": 8}, motion_encoder_size=16, motion_style_dim=8,
            motion_dim=4, motion_encoder_dim=8, face_encoder_hidden_dim=8, face_encoder_num_heads=2,
            inject_face_latents_blocks=1)  # fmt: skip
    # 4 pose frames + 1 reference frame; 13 face frames (the face encoder downsamples time by 4).
    return m, {"hidden_states": _r(1, 12, 5, 8, 8), "timestep": torch.tensor([3]), "encoder_hidden_states": _r(1, 5, 16),
               "encoder_hidden_states_image": _r(1, 3, 16), "pose_hidden_states": _r(1, 4, 4, 8, 8),
               "face_pixel_values": _r(1, 3, 13, 16, 16)}  # fmt: skip


def _zimage_transformer() -> torch.nn.Module:
    return _mk("ZImageTransformer2DModel", all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=16, n_layers=1,
               n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=16, axes_dims=[4, 2, 2],
               axes_lens=[64, 16, 16])  # fmt: skip


def zimage() -> tuple[torch.nn.Module, Inputs]:
    # 32 caption tokens and 16 image tokens: multiples of the padding unit, so no pad rows (they make NaN rows).
    return _zimage_transformer(), {"x": [_r(4, 1, 8, 8)], "t": torch.tensor([0.5]), "cap_feats": [_r(32, 16)]}


def zimage_controlnet() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import ZImageControlNetModel

    transformer = _zimage_transformer()
    _seed()
    cn = ZImageControlNetModel(control_layers_places=[0], control_in_dim=4, all_patch_size=(2,), all_f_patch_size=(1,),
                               dim=16, n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True).eval()  # fmt: skip
    m = ZImageControlNetModel.from_transformer(cn, transformer)
    return m, {"x": [_r(4, 1, 8, 8)], "t": torch.tensor([0.5]), "cap_feats": [_r(32, 16)],
               "control_context": [_r(4, 1, 8, 8)]}  # fmt: skip


def multi_controlnet() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import MultiControlNetModel

    a, inputs = controlnet()
    b, _ = controlnet()
    cond = inputs.pop("controlnet_cond")
    return MultiControlNetModel([a, b]).eval(), dict(inputs, controlnet_cond=[cond, cond], conditioning_scale=[1.0, 0.5])


def sd3_multi_controlnet() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import SD3MultiControlNetModel

    a, inputs = sd3_controlnet()
    b, _ = sd3_controlnet()
    cond = inputs.pop("controlnet_cond")
    return SD3MultiControlNetModel([a, b]).eval(), dict(inputs, controlnet_cond=[cond, cond], conditioning_scale=[1.0, 0.5])


def flux_multi_controlnet() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import FluxControlNetModel, FluxMultiControlNetModel

    _, inputs = tiny.flux()
    nets = []
    for _i in range(2):  # two union controlnets (num_mode set): the multi path passes one mode per net
        _seed()
        nets.append(FluxControlNetModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                                        axes_dims_rope=(2, 2, 4), num_mode=2).eval())  # fmt: skip
    cond = torch.randn(1, 16, 8)
    return FluxMultiControlNetModel(nets).eval(), dict(inputs, controlnet_cond=[cond, cond], conditioning_scale=[1.0, 0.5],
                                                       controlnet_mode=[torch.tensor([0]), torch.tensor([1])])  # fmt: skip


def qwen_multi_controlnet() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import QwenImageMultiControlNetModel

    a, inputs = qwen_controlnet()
    cond = inputs.pop("controlnet_cond")
    return QwenImageMultiControlNetModel([a]).eval(), dict(inputs, controlnet_cond=[cond], conditioning_scale=[0.5])


def hunyuan_multi_controlnet() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import HunyuanDiT2DMultiControlNetModel

    a, inputs = hunyuan_dit_controlnet()
    b, _ = hunyuan_dit_controlnet()
    cond = inputs.pop("controlnet_cond")
    return HunyuanDiT2DMultiControlNetModel([a, b]).eval(), dict(inputs, controlnet_cond=[cond, cond], conditioning_scale=[1.0, 0.5])


def hunyuan_image() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("HunyuanImageTransformer2DModel", in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
            num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=16,
            rope_axes_dim=(4, 4))  # fmt: skip
    mask = torch.ones(1, 5)
    mask[:, -1] = 0
    return m, {"hidden_states": _r(1, 4, 4, 4), "timestep": torch.tensor([3.0]), "encoder_hidden_states": _r(1, 5, 16),
               "encoder_attention_mask": mask}  # fmt: skip


def ltx2() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("LTX2VideoTransformer3DModel", in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
            attention_head_dim=8, cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4,
            audio_num_attention_heads=2, audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=1,
            qk_norm="rms_norm_across_heads", caption_channels=16, rope_double_precision=False)  # fmt: skip
    return m, {"hidden_states": _r(1, 2 * 4 * 4, 4), "audio_hidden_states": _r(1, 5, 4), "encoder_hidden_states": _r(1, 6, 16),
               "audio_encoder_hidden_states": _r(1, 6, 16), "timestep": torch.tensor([300.0]),
               "encoder_attention_mask": torch.ones(1, 6, dtype=torch.bool), "num_frames": 2, "height": 4, "width": 4,
               "audio_num_frames": 5, "fps": 25.0}  # fmt: skip


def kandinsky6() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("Kandinsky6Transformer3DModel", in_visual_dim=4, out_visual_dim=4, in_text_dim=8, in_text_dim2=8, time_dim=16,
            patch_size=(1, 2, 2), model_dim=24, ff_dim=32, num_text_blocks=1, num_visual_blocks=1, axes_dims=(4, 4, 4),
            visual_cond=True, in_audio_dim=4, out_audio_dim=4)  # fmt: skip
    return m, {"hidden_states": _r(1, 2, 4, 4, 9), "encoder_hidden_states": _r(1, 6, 8), "pooled_projections": _r(1, 8),
               "timestep": torch.tensor([300.0]), "audio_hidden_states": _r(1, 5, 4)}  # fmt: skip


def kandinsky5() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("Kandinsky5Transformer3DModel", in_visual_dim=4, in_text_dim=8, in_text_dim2=8, time_dim=16, out_visual_dim=4,
            patch_size=(1, 2, 2), model_dim=24, ff_dim=32, num_text_blocks=1, num_visual_blocks=1, axes_dims=(4, 4, 4))  # fmt: skip
    return m, {"hidden_states": _r(1, 2, 4, 4, 4), "encoder_hidden_states": _r(1, 6, 8), "pooled_projections": _r(1, 8),
               "timestep": torch.tensor([300.0]), "visual_rope_pos": (torch.arange(2), torch.arange(2), torch.arange(2)),
               "text_rope_pos": torch.arange(6)}  # fmt: skip


def ideogram4() -> tuple[torch.nn.Module, Inputs]:
    from diffusers.models.transformers import transformer_ideogram4 as t

    m = _mk("Ideogram4Transformer2DModel", in_channels=8, num_layers=1, attention_head_dim=8, num_attention_heads=2,
            intermediate_size=32, adaln_dim=16, llm_features_dim=12, rope_theta=10_000, mrope_section=(2, 1, 1))  # fmt: skip
    text, img = 4, 4
    hidden = torch.zeros(1, text + img, 8)
    hidden[:, text:] = _r(1, img, 8)
    context = torch.zeros(1, text + img, 12)
    context[:, :text] = _r(1, text, 12)
    pos = torch.zeros(1, text + img, 3, dtype=torch.long)
    pos[:, :text] = torch.arange(text)[:, None]
    pos[:, text:, 0] = t.IMAGE_POSITION_OFFSET
    pos[:, text:, 1] = torch.tensor([0, 0, 1, 1]) + t.IMAGE_POSITION_OFFSET
    pos[:, text:, 2] = torch.tensor([0, 1, 0, 1]) + t.IMAGE_POSITION_OFFSET
    indicator = torch.full((1, text + img), t.OUTPUT_IMAGE_INDICATOR, dtype=torch.long)
    indicator[:, :text] = t.LLM_TOKEN_INDICATOR
    return m, {"hidden_states": hidden, "encoder_hidden_states": context, "timestep": torch.tensor([0.5]),
               "position_ids": pos, "segment_ids": torch.ones(1, text + img, dtype=torch.long), "indicator": indicator}  # fmt: skip


def qwen_image21(flex: bool = False) -> tuple[torch.nn.Module, Inputs]:
    m = _mk("QwenImage21Transformer2DModel", patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=16,
            num_attention_heads=2, context_in_dim=8, mlp_ratio=2, axes_dims_rope=(4, 6, 6))  # fmt: skip
    if flex:  # the block-causal BlockMask through the dispatcher's flex backend (the release's other processor)
        from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21FlexAttnProcessor

        m.set_attn_processor(QwenImage21FlexAttnProcessor())
    img_mask = torch.zeros(1, 4 + 1, dtype=torch.bool)
    img_mask[:, 4:] = True  # one vision slot per 2x2 group of target latents, after the text
    return m, {"hidden_states": _r(1, 4, 4), "encoder_hidden_states": _r(1, 4, 8),
               "encoder_hidden_states_mask": torch.ones(1, 4, dtype=torch.long), "timestep": torch.tensor([1.0]),
               "img_shapes": [[(1, 2, 2)]], "img_mask": img_mask}  # fmt: skip


def stable_audio3() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("StableAudio3DiTModel", io_channels=4, patch_size=1, embed_dim=16, depth=1, num_heads=2, cond_token_dim=8,
            global_cond_dim=8, local_add_cond_dim=5, timestep_features_dim=8, ff_mult=2, num_memory_tokens=2,
            use_differential_attention=True)  # fmt: skip
    mask = torch.ones(1, 4, dtype=torch.bool)
    mask[:, -1] = False
    return m, {"hidden_states": _r(1, 4, 8), "timestep": torch.tensor([0.5]), "encoder_hidden_states": _r(1, 4, 8),
               "global_hidden_states": _r(1, 8), "encoder_attention_mask": mask}  # fmt: skip


def allegro_vae() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("AutoencoderKLAllegro", block_out_channels=(8, 16), down_block_types=("AllegroDownBlock3D",) * 2,
            up_block_types=("AllegroUpBlock3D",) * 2, temporal_downsample_blocks=(False, False),
            temporal_upsample_blocks=(False, False), latent_channels=4, layers_per_block=1, norm_num_groups=4,
            temporal_compression_ratio=1, sample_size=8)  # fmt: skip
    # Allegro encodes only through tiling; one tile covering the whole tiny video (its default overlaps assume 320px).
    m.enable_tiling()
    m.kernel = m.stride = (4, 8, 8)
    return m, {"sample": _r(1, 3, 4, 8, 8)}


def cosmos_vae() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("AutoencoderKLCosmos", latent_channels=4, encoder_block_out_channels=(8, 8, 8, 8),
            decode_block_out_channels=(8, 8, 8, 8), attention_resolutions=(8,), resolution=64, num_layers=1, patch_size=4,
            spatial_compression_ratio=4, temporal_compression_ratio=4, latents_mean=None, latents_std=None)  # fmt: skip
    return m, {"sample": _r(1, 3, 9, 32, 32)}


def hunyuan_video_vae() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("AutoencoderKLHunyuanVideo", latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
            down_block_types=("HunyuanVideoDownBlock3D",) * 4, up_block_types=("HunyuanVideoUpBlock3D",) * 4,
            norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4)  # fmt: skip
    return m, {"sample": _r(1, 3, 5, 16, 16)}


def mochi_vae() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("AutoencoderKLMochi", in_channels=15, out_channels=3, latent_channels=4, encoder_block_out_channels=(32,) * 4,
            decoder_block_out_channels=(32,) * 4, layers_per_block=(1, 1, 1, 1, 1), latents_mean=(0.0,) * 4,
            latents_std=(1.0,) * 4)  # fmt: skip
    return m, {"sample": _r(1, 3, 7, 16, 16)}


def consistency_vae() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("ConsistencyDecoderVAE", encoder_block_out_channels=(8, 16), encoder_down_block_types=("DownEncoderBlock2D",) * 2,
            encoder_layers_per_block=1, encoder_norm_num_groups=4, decoder_block_out_channels=(8, 16),
            decoder_down_block_types=("ResnetDownsampleBlock2D",) * 2, decoder_up_block_types=("ResnetUpsampleBlock2D",) * 2,
            decoder_layers_per_block=1, decoder_norm_num_groups=4, decoder_add_attention=False, sample_size=16)  # fmt: skip
    # The consistency decoder samples noise: `run` seeds the global generator before each forward.
    return m, {"sample": _r(1, 3, 16, 16)}


def same_vae() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("AutoencoderSAME", audio_channels=2, patch_size=4, encoder_channels=16, encoder_c_mults=[1, 2],
            encoder_strides=[2, 2], encoder_transformer_depths=[1, 1], latent_dim=8, use_differential_attention=True,
            dim_heads=8, ff_mult=2)  # fmt: skip
    return m, {"sample": _r(1, 2, 128)}


def minimax_h3_vae() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("AutoencoderKLMiniMaxH3", latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            spatial_downsample_factors=(2, 2), temporal_downsample_factors=(2, 2), norm_num_groups=8, decoder_num_layers=1,
            decoder_num_attention_heads=2, decoder_attention_head_dim=8, decoder_num_register_tokens=2, decoder_ffn_mult=2,
            latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)  # fmt: skip
    return m, {"sample": _r(1, 3, 22, 8, 8)}


def rae() -> tuple[torch.nn.Module, Inputs]:
    # The dinov2 encoder (a transformers model) is built from a config with 64-dim heads: hidden size 64 = one head.
    m = _mk("AutoencoderRAE", encoder_type="dinov2", encoder_hidden_size=64, encoder_patch_size=8,
            encoder_num_hidden_layers=1, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
            decoder_intermediate_size=32, patch_size=4, encoder_input_size=16, image_size=8)  # fmt: skip
    return m, {"sample": _r(1, 3, 16, 16)}


def audioldm2_unet() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("AudioLDM2UNet2DConditionModel", block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
            sample_size=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=(8, 16), attention_head_dim=8)  # fmt: skip
    return m, {"sample": _r(1, 4, 8, 8), "timestep": torch.tensor(3), "encoder_hidden_states": _r(1, 5, 16),
               "encoder_hidden_states_1": _r(1, 6, 8)}  # fmt: skip


def dreamlite_unet() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("DreamLiteUNetModel", block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=8,
            cross_attention_dim=16, attention_head_dim=8)  # fmt: skip
    return m, {"sample": _r(1, 4, 8, 8), "timestep": torch.tensor(3), "encoder_hidden_states": _r(1, 5, 16)}


def dreamlite_transformer() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("DreamLiteTransformer2DModel", num_attention_heads=2, attention_head_dim=8, in_channels=16, num_layers=1,
            cross_attention_dim=16, norm_num_groups=8)  # fmt: skip
    return m, {"hidden_states": _r(1, 16, 4, 4), "encoder_hidden_states": _r(1, 5, 16)}


def controlnet_union() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("ControlNetUnionModel", block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
            attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), norm_num_groups=8,
            conditioning_embedding_out_channels=(8, 16), addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=16 + 6 * 8, num_control_type=2, num_trans_channel=32, num_trans_head=2,
            num_proj_channel=32)  # fmt: skip
    return m, {"sample": _r(1, 4, 16, 16), "timestep": torch.tensor(10), "encoder_hidden_states": _r(1, 7, 32),
               "controlnet_cond": [_r(1, 3, 32, 32)], "control_type": torch.tensor([[1, 0]]), "control_type_idx": [0],
               "added_cond_kwargs": {"text_embeds": _r(1, 16), "time_ids": _r(1, 6)}}  # fmt: skip


def unidiffuser() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("UniDiffuserModel", text_dim=8, clip_img_dim=8, num_text_tokens=4, num_attention_heads=2, attention_head_dim=8,
            in_channels=4, out_channels=4, num_layers=2, norm_num_groups=8, sample_size=8, patch_size=2,
            block_type="unidiffuser", use_timestep_embedding=False, use_patch_pos_embed=False)  # fmt: skip
    return m, {"latent_image_embeds": _r(1, 4, 8, 8), "image_embeds": _r(1, 1, 8), "prompt_embeds": _r(1, 4, 8),
               "timestep_img": torch.tensor([3]), "timestep_text": torch.tensor([5])}  # fmt: skip


def bria_fibo() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("BriaFiboTransformer2DModel", patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, text_encoder_dim=8,
            pooled_projection_dim=None, axes_dims_rope=[0, 4, 4])  # fmt: skip
    ctx = _r(1, 6, 16)
    return m, {"hidden_states": _r(1, 16, 8), "encoder_hidden_states": ctx, "img_ids": _img_ids(4, 4),
               "txt_ids": torch.zeros(6, 3), "timestep": torch.tensor([1.0]),
               "text_encoder_layers": [ctx[:, :, :8], ctx[:, :, :8]]}  # fmt: skip


def ernie_image() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("ErnieImageTransformer2DModel", hidden_size=16, num_attention_heads=2, num_layers=1, ffn_hidden_size=16,
            in_channels=4, out_channels=4, patch_size=1, text_in_dim=16, rope_theta=256, rope_axes_dim=(4, 2, 2),
            qk_layernorm=True)  # fmt: skip
    return m, {"hidden_states": _r(1, 4, 4, 4), "timestep": torch.tensor([1.0]), "text_bth": _r(1, 5, 16),
               "text_lens": torch.tensor([4])}  # fmt: skip


def glm_image() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("GlmImageTransformer2DModel", patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
            num_attention_heads=2, text_embed_dim=16, time_embed_dim=16, condition_dim=8,
            prior_vq_quantizer_codebook_size=16)  # fmt: skip
    return m, {"hidden_states": _r(1, 4, 8, 8), "encoder_hidden_states": _r(1, 5, 16), "prior_token_id": torch.tensor([3]),
               "prior_token_drop": torch.zeros(1, dtype=torch.bool), "timestep": torch.tensor([3]),
               "target_size": torch.tensor([[8.0, 8.0]]), "crop_coords": torch.tensor([[0.0, 0.0]])}  # fmt: skip


def hunyuan_video15() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("HunyuanVideo15Transformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
            num_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
            text_embed_2_dim=8, image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v")  # fmt: skip
    mask = torch.ones(1, 6)
    mask[:, -1] = 0
    return m, {"hidden_states": _r(1, 4, 1, 4, 4), "timestep": torch.tensor([1.0]), "encoder_hidden_states": _r(1, 6, 16),
               "encoder_hidden_states_2": _r(1, 4, 8), "encoder_attention_mask": mask,
               "encoder_attention_mask_2": torch.ones(1, 4), "image_embeds": torch.zeros(1, 3, 12)}  # fmt: skip


def framepack() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("HunyuanVideoFramepackTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
            attention_head_dim=10, num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1,
            guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
            image_condition_type=None, has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True)  # fmt: skip
    f = 3
    return m, {"hidden_states": _r(1, 4, f, 4, 4), "timestep": torch.tensor([3]), "encoder_hidden_states": _r(1, 5, 16),
               "pooled_projections": _r(1, 8), "encoder_attention_mask": torch.ones(1, 5), "guidance": torch.tensor([3]),
               "image_embeds": _r(1, 5, 16), "indices_latents": torch.ones(f), "latents_clean": _r(1, 4, f - 1, 4, 4),
               "indices_latents_clean": torch.ones(f - 1), "latents_history_2x": _r(1, 4, f - 1, 4, 4),
               "indices_latents_history_2x": torch.ones(f - 1), "latents_history_4x": _r(1, 4, (f - 1) * 4, 4, 4),
               "indices_latents_history_4x": torch.ones((f - 1) * 4)}  # fmt: skip


def krea2() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("Krea2Transformer2DModel", in_channels=8, num_layers=1, attention_head_dim=8, num_attention_heads=2,
            num_key_value_heads=1, intermediate_size=16, timestep_embed_dim=8, text_hidden_dim=8, num_text_layers=2,
            text_num_attention_heads=2, text_num_key_value_heads=1, text_intermediate_size=16, num_layerwise_text_blocks=1,
            num_refiner_text_blocks=1, axes_dims_rope=(4, 2, 2), rope_theta=1000.0)  # fmt: skip
    text, h, w = 4, 2, 2
    pos = torch.zeros(text + h * w, 3)
    pos[text:, 1] = torch.arange(h).repeat_interleave(w)
    pos[text:, 2] = torch.arange(w).repeat(h)
    mask = torch.ones(1, text, dtype=torch.bool)
    mask[:, -1] = False
    return m, {"hidden_states": _r(1, h * w, 8), "encoder_hidden_states": _r(1, text, 2, 8), "timestep": torch.tensor([0.5]),
               "position_ids": pos, "encoder_attention_mask": mask}  # fmt: skip


def anyflow(cls_name: str = "AnyFlowTransformer3DModel") -> tuple[torch.nn.Module, Inputs]:
    m = _mk(cls_name, patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, cross_attn_norm=True, rope_max_seq_len=32, gate_value=0.25,
            deltatime_type="r")  # fmt: skip
    return m, {"hidden_states": _r(1, 2, 4, 8, 8), "timestep": torch.full((1, 2), 500.0),
               "r_timestep": torch.full((1, 2), 250.0), "encoder_hidden_states": _r(1, 5, 16)}  # fmt: skip


def helios() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("HeliosTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
            out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_dim=(4, 4, 4), has_multi_term_memory_patch=True, guidance_cross_attn=True,
            zero_history_timestep=True, is_amplify_history=False)  # fmt: skip
    f = 2
    return m, {"hidden_states": _r(1, 4, f, 8, 8), "timestep": torch.tensor([3]), "encoder_hidden_states": _r(1, 5, 16),
               "indices_hidden_states": torch.ones(1, f), "indices_latents_history_short": torch.ones(1, f - 1),
               "indices_latents_history_mid": torch.ones(1, f - 1), "indices_latents_history_long": torch.ones(1, (f - 1) * 4),
               "latents_history_short": _r(1, 4, f - 1, 8, 8), "latents_history_mid": _r(1, 4, f - 1, 8, 8),
               "latents_history_long": _r(1, 4, (f - 1) * 4, 8, 8)}  # fmt: skip


def motif_video() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("MotifVideoTransformer3DModel", in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=12,
            num_layers=1, num_single_layers=1, num_decoder_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1,
            qk_norm="rms_norm", norm_type="layer_norm", text_embed_dim=16, image_embed_dim=4, rope_theta=256.0,
            rope_axes_dim=(4, 4, 4), enable_text_cross_attention_dual=True, enable_text_cross_attention_single=True)  # fmt: skip
    return m, {"hidden_states": _r(1, 9, 1, 4, 4), "encoder_hidden_states": _r(1, 5, 16), "timestep": torch.tensor([3])}


def nucleus_moe() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("NucleusMoEImageTransformer2DModel", patch_size=2, in_channels=16, out_channels=4, num_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
            moe_enabled=False, capacity_factors=[8.0])  # fmt: skip
    mask = torch.ones(1, 6, dtype=torch.long)
    mask[:, -1] = 0
    return m, {"hidden_states": _r(1, 16, 16), "encoder_hidden_states": _r(1, 6, 16), "encoder_hidden_states_mask": mask,
               "timestep": torch.tensor([1.0]), "img_shapes": [(1, 4, 4)]}  # fmt: skip


def prx() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("PRXTransformer2DModel", in_channels=4, patch_size=2, context_in_dim=16, hidden_size=16, mlp_ratio=2.0,
            num_heads=2, depth=1, axes_dim=[4, 4], theta=10_000)  # fmt: skip
    return m, {"hidden_states": _r(1, 4, 8, 8), "encoder_hidden_states": _r(1, 5, 16), "timestep": torch.tensor([1.0])}


def minimax_h3() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("MiniMaxH3Transformer3DModel", num_attention_heads=2, attention_head_dim=16, hidden_size=24, num_layers=1,
            num_refiner_layers=1, ffn_dim=32, in_channels=4, audio_in_channels=6, patch_size=(1, 2, 2), text_dim=8,
            freq_dim=8, time_embed_hidden_dim=24, time_embed_dim=16, rope_freq_dim=2)  # fmt: skip
    text, audio, video = 4, 6, 8
    n = text + audio + video
    ti, ai, vi = torch.arange(text), torch.arange(text, text + audio), torch.arange(text + audio, n)
    tags = torch.zeros(n, dtype=torch.long)
    tags[ti], tags[ai] = 1, 2  # 0 video, 1 text, 2 audio
    t_idx = torch.zeros(n, dtype=torch.long)
    t_idx[ai] = 1
    pos = torch.zeros(n, 3)
    pos[:, 0] = torch.arange(n, dtype=torch.float32)
    pos[vi, 1] = torch.arange(video, dtype=torch.float32) % 4
    pos[vi, 2] = torch.arange(video, dtype=torch.float32) % 2
    return m, {"hidden_states": _r(1, video, 16), "audio_hidden_states": _r(1, audio, 6), "encoder_hidden_states": _r(1, text, 8),
               "timestep": torch.tensor([0.7, 0.3]), "timestep_indices": t_idx, "token_tags": tags, "position_ids": pos,
               "video_indices": vi, "audio_indices": ai, "text_indices": ti}  # fmt: skip


def anyflow_far() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("AnyFlowFARTransformer3DModel", patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4), full_chunk_limit=3,
            num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16, freq_dim=16,
            ffn_dim=32, num_layers=1, cross_attn_norm=True, rope_max_seq_len=32, gate_value=0.25, deltatime_type="r")  # fmt: skip
    # Causal self-attention through the dispatcher's flex backend (a BlockMask); two chunks of two frames.
    return m, {"hidden_states": _r(1, 4, 4, 8, 8), "timestep": torch.full((1, 4), 500.0),
               "r_timestep": torch.full((1, 4), 250.0), "encoder_hidden_states": _r(1, 5, 16), "chunk_partition": [2, 2]}  # fmt: skip


def joyimage_edit() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("JoyImageEditTransformer3DModel", patch_size=[1, 2, 2], in_channels=4, hidden_size=32, num_attention_heads=2,
            text_dim=16, num_layers=1, rope_dim_list=[4, 6, 6], theta=256)  # fmt: skip
    return m, {"hidden_states": _r(1, 4, 1, 4, 4), "timestep": torch.tensor([1.0]), "encoder_hidden_states": _r(1, 5, 16)}


def joyimage_edit_plus() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("JoyImageEditPlusTransformer3DModel", patch_size=[1, 2, 2], in_channels=4, hidden_size=32, num_attention_heads=2,
            text_dim=16, num_layers=1, rope_dim_list=[4, 6, 6], theta=256)  # fmt: skip
    return m, {"hidden_states": _r(1, 2, 4, 1, 2, 2), "encoder_hidden_states": _r(1, 5, 16), "timestep": torch.tensor([1.0]),
               "shape_list": [[(1, 1, 1), (1, 1, 1)]]}  # fmt: skip


def kandinsky6_sr() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("Kandinsky6SRTransformer3DModel", in_visual_dim=4, out_visual_dim=8, time_dim=16, patch_size=(1, 2, 2),
            model_dim=24, ff_dim=32, num_visual_blocks=1, axes_dims=(4, 4, 4))  # fmt: skip
    return m, {"hidden_states": _r(1, 1, 16, 16, 9), "timestep": torch.tensor([300.0])}


def longcat_audio() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("LongCatAudioDiTTransformer", dit_dim=32, dit_depth=1, dit_heads=2, dit_text_dim=16, latent_dim=8,
            text_conv=False)  # fmt: skip
    mask = torch.ones(1, 6, dtype=torch.bool)
    mask[:, -1] = False
    return m, {"hidden_states": _r(1, 8, 8), "encoder_hidden_states": _r(1, 6, 16), "encoder_attention_mask": mask,
               "attention_mask": torch.ones(1, 8, dtype=torch.bool), "timestep": torch.ones(1)}  # fmt: skip


def sana_wm() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("SanaWMTransformer3DModel", in_channels=4, num_layers=2, hidden_size=32, num_attention_heads=2, patch_size=(1, 1, 1),
            softmax_every_n=2, linear_head_dim=16, t_kernel_size=3, conv_kernel_size=4, caption_channels=8,
            mlp_ratio=2.0, chunk_plucker_channels=4, chunk_plucker_post_attn_blocks=2, mixed_precision="fp32")  # fmt: skip
    f, h, w = 2, 4, 4
    c2w = torch.eye(4).repeat(1, f, 1, 1)
    c2w[..., 2, 3] = torch.arange(f, dtype=torch.float32) * 0.1
    intr = torch.tensor([float(w), float(h), w / 2, h / 2]).expand(1, f, 4)
    return m, {"hidden_states": _r(1, 4, f, h, w), "timestep": torch.full((1, 1, f), 300.0),
               "encoder_hidden_states": _r(1, 1, 6, 8), "encoder_attention_mask": torch.ones(1, 6, dtype=torch.long),
               "camera_conditions": torch.cat([c2w.flatten(-2), intr], -1), "chunk_plucker": _r(1, 4, f, h, w)}  # fmt: skip


_ACE = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
            sliding_window=4)  # fmt: skip


def ace_step() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("AceStepTransformer1DModel", hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, in_channels=12, audio_acoustic_hidden_dim=4, patch_size=2,
            sliding_window=4)  # fmt: skip
    return m, {"hidden_states": _r(1, 8, 4), "timestep": torch.tensor([0.5]), "timestep_r": torch.tensor([0.2]),
               "encoder_hidden_states": _r(1, 6, 16), "context_latents": _r(1, 8, 8)}  # fmt: skip


def ace_detokenizer() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("AceStepAudioTokenDetokenizer", audio_acoustic_hidden_dim=4, pool_window_size=2,
            num_attention_pooler_hidden_layers=2, **_ACE)  # fmt: skip
    return m, {"hidden_states": _r(1, 3, 16)}


def ace_tokenizer() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("AceStepAudioTokenizer", audio_acoustic_hidden_dim=4, pool_window_size=2, fsq_dim=16,
            fsq_input_levels=[3, 3, 3], num_attention_pooler_hidden_layers=2, **_ACE)  # fmt: skip
    return m, {"hidden_states": _r(1, 3, 2, 4)}  # (batch, patches, pool window, acoustic dim)


def anima() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("AnimaTextConditioner", source_dim=16, target_dim=16, model_dim=16, num_layers=1, num_attention_heads=2,
            mlp_ratio=2.0, target_vocab_size=32, min_sequence_length=8)  # fmt: skip
    return m, {"source_hidden_states": _r(1, 5, 16), "target_input_ids": torch.randint(0, 32, (1, 6))}


def minimax_music3() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("MiniMaxMusic3Transformer1DModel", in_channels=4, condition_dim=8, num_layers=1, num_attention_heads=2,
            attention_head_dim=8, ff_inner_dim=16, rotary_dim=4, fourier_embedding_dim=8)  # fmt: skip
    return m, {"hidden_states": _r(1, 4, 8), "encoder_hidden_states": _r(1, 8, 8), "timestep": torch.tensor([0.5])}


def minimax_rvq_depth() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("MiniMaxMusic3RVQDepthDecoder", hidden_size=16, num_layers=1, num_attention_heads=2, intermediate_size=32,
            audio_vocab_size=16, num_codebooks=4, max_position_embeddings=8)  # fmt: skip
    return m, {"inputs_embeds": _r(1, 4, 16)}


def bria_fibo2() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("BriaFibo2Transformer2DModel", in_channels=4, patch_size=2, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
            cap_feat_dim=24, injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4, max_num_gist_tokens=8,
            gist_step=4, gist_min_text_len=4, gist_max_text_len=16, axes_dims=(4, 6, 6), axes_lens=(16, 16, 16))  # fmt: skip
    return m, {"hidden_states": _r(1, 4, 8, 8), "timestep": torch.tensor([0.5]), "encoder_hidden_states": _r(1, 2, 6, 24)}


def sana_wm_refiner() -> tuple[torch.nn.Module, Inputs]:
    from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMLTX2AudioVideoRotaryPosEmbed

    m = _mk("SanaWMLTX2RefinerTransformer3DModel", in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
            num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4,
            audio_num_attention_heads=2, audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=1,
            qk_norm="rms_norm_across_heads", caption_channels=16, rope_double_precision=False)  # fmt: skip
    rope = SanaWMLTX2AudioVideoRotaryPosEmbed(dim=16, patch_size=1, patch_size_t=1, base_num_frames=20, base_height=2048,
                                              base_width=2048, scale_factors=(8, 32, 32), modality="video",
                                              double_precision=False, num_attention_heads=2)  # fmt: skip
    coords = rope.prepare_video_coords(1, 2, 4, 4, device=torch.device("cpu"), fps=24.0)
    return m, {"hidden_states": _r(1, 32, 4), "encoder_hidden_states": _r(1, 6, 16), "timestep": torch.full((1, 32), 300.0),
               "video_rotary_emb": rope(coords, device=torch.device("cpu")), "encoder_attention_mask": torch.ones(1, 6)}  # fmt: skip


def _wan_like_vae(cls_name: str, **extra: Any) -> tuple[torch.nn.Module, Inputs]:
    # attn_scales=[] still leaves the mid-block attention (F.sdpa outside any processor).
    m = _mk(cls_name, base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[], temperal_downsample=[False],
            latents_mean=[0.0] * 4, latents_std=[1.0] * 4, **extra)  # fmt: skip
    return m, {"sample": _r(1, 3, 1, 8, 8)}


def wan_vae() -> tuple[torch.nn.Module, Inputs]:
    return _wan_like_vae("AutoencoderKLWan")


def qwen_vae() -> tuple[torch.nn.Module, Inputs]:
    return _wan_like_vae("AutoencoderKLQwenImage")


def qwen21_vae() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("AutoencoderKLQwenImage21", base_dim=16, decoder_base_dim=16, z_dim=4, dim_mult=[1, 1], num_res_blocks=1,
            attn_scales=[], temperal_downsample=[False], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)  # fmt: skip
    return m, {"sample": _r(1, 4, 1, 8, 8)}  # four input channels in this release


def _hunyuan15_like_vae(cls_name: str) -> tuple[torch.nn.Module, Inputs]:
    m = _mk(cls_name, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1, spatial_compression_ratio=2,
            temporal_compression_ratio=1)  # fmt: skip
    return m, {"sample": _r(1, 3, 1, 8, 8)}


def hunyuan_video15_vae() -> tuple[torch.nn.Module, Inputs]:
    return _hunyuan15_like_vae("AutoencoderKLHunyuanVideo15")


def hunyuan_image_refiner_vae() -> tuple[torch.nn.Module, Inputs]:
    return _hunyuan15_like_vae("AutoencoderKLHunyuanImageRefiner")


def hunyuan_image_vae() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("AutoencoderKLHunyuanImage", in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
            layers_per_block=1, spatial_compression_ratio=2, sample_size=8)  # fmt: skip
    return m, {"sample": _r(1, 3, 8, 8)}


def vidtok() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("AutoencoderVidTok", ch=8, ch_mult=[1, 2], z_channels=4, num_res_blocks=1, spatial_ds=[1], spatial_us=[1],
            tempo_ds=[], tempo_us=[])  # fmt: skip
    return m, {"sample": _r(1, 3, 1, 8, 8), "sample_posterior": False}


def unidiffuser_text_decoder() -> tuple[torch.nn.Module, Inputs]:
    # A GPT-2 (transformers) inside: its attention is traced by the transformers adapter.
    m = _mk("UniDiffuserTextDecoder", prefix_length=2, prefix_inner_dim=8, prefix_hidden_dim=8, vocab_size=32,
            n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return m, {"input_ids": torch.randint(0, 32, (1, 5)), "prefix_embeds": _r(1, 2, 8)}


def kvae_audio() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("AutoencoderKLKVAEAudio", encoder_dim=8, encoder_rates=[2, 2], latent_dim=16, codebook_dim=8, decoder_dim=16,
            decoder_rates=[2, 2], attn_num_heads=2)  # fmt: skip
    return m, {"sample": _r(1, 1, 64)}


def minimax_h3_audio() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("AutoencoderKLMiniMaxH3Audio", encoder_dim=8, encoder_rates=(2, 2), latent_dim=16, latent_channels=4,
            num_attention_heads=2, decoder_dim=16, decoder_rates=(2, 2), decoder_kernel_sizes=(4, 4),
            resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1,),))  # fmt: skip
    return m, {"sample": _r(1, 1, 64)}


def mmaudio_vae() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("MMAudioVAE", mel_bins=16, latent_channels=4, hidden_channels=16, channel_multipliers=(1, 2), layers_per_block=1,
            n_fft=64, hop_length=16)  # fmt: skip
    return m, {"sample": _r(1, 256).clamp(-1, 1)}  # a waveform; the encoder computes its log-mel spectrogram


def wan_animate2() -> tuple[torch.nn.Module, Inputs]:
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    m = _mk("WanAnimate2Transformer3DModel", patch_size=(1, 2, 2), text_len=8, in_dim=4 + 8, dim=16, ffn_dim=32, freq_dim=16,
            text_dim=16, out_dim=4, num_heads=2, num_layers=1, cross_attn_norm=True, use_img_emb=True)  # fmt: skip
    # The reference pass (`kv_cache_mode="extract"`): it only writes the cache, so repeating it is deterministic.
    return m, {"hidden_states": [_r(4, 2, 4, 4)], "timestep": torch.tensor([1.0]), "encoder_hidden_states": [_r(6, 16)],
               "condition_latents": [_r(8, 2, 4, 4)], "encoder_hidden_states_image": _r(1, 3, 1280),  # CLIP width is fixed
               "kv_cache": WanAnimate2KVCache(1), "kv_cache_mode": "extract", "seq_len": 2 * 2 * 2,
               "offset_grid_sizes": torch.tensor([[2, 2, 2]])}  # fmt: skip


def ltx2_diffusion_decoder() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("LTX2VideoDiffusionDecoderModel", out_channels=3, latent_channels=8, patch_size=2, decoder_head_dim=16,
            decoder_stage_channels=(32, 16, 16, 16, 16), decoder_stage_depths=(1, 1, 1, 1, 1),
            decoder_stage_kernels=((1, 3, 3),) * 4, decoder_upsample_strides=((1, 2, 2), (2, 1, 1), (2, 2, 2), (2, 2, 2)),
            decoder_upsample_channel_reductions=(2, 1, 1, 1), decoder_stage5_kernel=(1, 3, 3), decoder_t_emb_dim=16,
            spatial_compression_ratio=16, temporal_compression_ratio=8)  # fmt: skip
    # Neighbourhood attention needs every stage >= its kernel: (1, 3, 3) kernels and one 3x3 latent frame keep the
    # last stage at 48x48 tokens. The decoder denoises: its noise comes from `run`'s seed.
    return m, {"z": _r(1, 8, 1, 3, 3)}


def flux3() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("Flux3Transformer2DModel", in_channels=8, cond_in_channels=8, num_layers=1, num_single_layers=1,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, timestep_channels=16, mlp_ratio=2.0,
            axes_dims_rope=(2, 2, 2, 2))  # fmt: skip
    img_ids = torch.zeros(16, 4)
    img_ids[:, 1] = torch.arange(4).repeat_interleave(4)
    img_ids[:, 2] = torch.arange(4).repeat(4)
    cond_ids = img_ids.clone()
    cond_ids[:, 0] = 1  # the reference image sits at another "time" index
    return m, {"hidden_states": _r(1, 16, 8), "encoder_hidden_states": _r(1, 6, 16), "timestep": torch.tensor([0.5]),
               "img_ids": img_ids, "txt_ids": torch.zeros(6, 4), "image_cond_hidden_states": _r(1, 16, 8),
               "image_cond_ids": cond_ids}  # fmt: skip


def cosmos3() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("Cosmos3OmniTransformer", head_dim=6, hidden_act="relu2", hidden_size=12, intermediate_size=24, latent_channel=2,
            latent_patch_size=1, num_attention_heads=2, num_hidden_layers=1, num_key_value_heads=1, patch_latent_dim=2,
            qk_norm_for_text=False, rope_axes_dim=[1, 1, 1], rope_theta=1e8, vocab_size=32)  # fmt: skip
    h = w = 2
    n = h * w
    seq = 3 + n
    vision = torch.arange(3, seq)
    return m, {"input_ids": torch.tensor([1, 2, 3]), "text_indexes": torch.tensor([0, 1, 2]),
               "position_ids": torch.zeros(3, seq, dtype=torch.long), "und_len": 3, "sequence_length": seq,
               "vision_tokens": [_r(1, 2, 1, h, w)], "vision_token_shapes": [(1, h, w)], "vision_sequence_indexes": vision,
               "vision_mse_loss_indexes": vision, "vision_timesteps": torch.ones(n),
               "vision_noisy_frame_indexes": [torch.tensor([0])]}  # fmt: skip


def ace_condition_encoder() -> tuple[torch.nn.Module, Inputs]:
    m = _mk("AceStepConditionEncoder", text_hidden_dim=8, timbre_hidden_dim=4, num_lyric_encoder_hidden_layers=2,
            num_timbre_encoder_hidden_layers=1, **_ACE)  # fmt: skip
    lyric_mask = torch.ones(1, 6, dtype=torch.long)
    lyric_mask[:, -1] = 0
    return m, {"text_hidden_states": _r(1, 5, 8), "text_attention_mask": torch.ones(1, 5, dtype=torch.long),
               "lyric_hidden_states": _r(1, 6, 8), "lyric_attention_mask": lyric_mask,
               "refer_audio_acoustic_hidden_states_packed": _r(1, 4, 4), "refer_audio_order_mask": torch.tensor([0])}  # fmt: skip


def rfd4_proteina() -> tuple[torch.nn.Module, Inputs]:
    # Only the backbone/latent features (the default feature lists need full structure annotations).
    m = _mk("RFD4ProteinaTransformer", nlayers=2, token_dim=16, nheads=2, dim_cond=8, pair_repr_dim=8, latent_dim=4,
            token_type_emb_dim=4, cath_emb_dim=4, t_emb_dim=8, seq_sep_dim=4, xt_pair_dist_dim=4, tri_mult_c=8,
            feats_seq=("xt_bb_ca", "xt_local_latents"), feats_cond_seq=("time_emb_bb_ca", "time_emb_local_latents"),
            feats_pair_repr=("xt_bb_ca_pair_dists",), feats_pair_cond=("time_emb_bb_ca",))  # fmt: skip
    n = 5
    return m, {"bb_ca": _r(1, n, 3), "local_latents": _r(1, n, 4), "bb_ca_time": torch.tensor([0.5]),
               "local_latents_time": torch.tensor([0.5]), "padding_mask": torch.ones(1, n, dtype=torch.bool),
               "conditioning": {"is_in_context_conditioning": torch.zeros(1, n, dtype=torch.bool),
                                "supports_local_latent": torch.ones(1, n, dtype=torch.bool)}}  # fmt: skip


def autoencoder_dc() -> tuple[torch.nn.Module, Inputs]:
    # EfficientViT blocks (the DC-AE release configs): multiscale linear attention, no probability matrix.
    m = _mk("AutoencoderDC", latent_channels=4, attention_head_dim=8, encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 16),
            decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
            encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)), decoder_norm_types="rms_norm")  # fmt: skip
    return m, {"sample": _r(1, 3, 8, 8)}


# ---- hand-written attention (softmax inline), traced by the torch-manual adapter ----


def unet1d() -> tuple[torch.nn.Module, Inputs]:
    """Dance-Diffusion-style UNet1DModel: SelfAttention1d in AttnDownBlock1D / UNetMidBlock1D / AttnUpBlock1D."""
    m = _mk("UNet1DModel", block_out_channels=(32, 32, 64), in_channels=2, out_channels=2, extra_in_channels=16,
            time_embedding_dim=16, down_block_types=("DownBlock1DNoSkip", "DownBlock1D", "AttnDownBlock1D"),
            up_block_types=("AttnUpBlock1D", "UpBlock1D", "UpBlock1DNoSkip"), mid_block_type="UNetMidBlock1D",
            out_block_type=None, sample_size=64)  # fmt: skip
    return m, {"sample": _r(1, 2, 64), "timestep": torch.tensor([3.0])}


def ltx2_audio_vae_attn() -> tuple[torch.nn.Module, Inputs]:
    """AutoencoderKLLTX2Audio with LTX2AudioAttnBlock (attn_resolutions and mid_block_add_attention)."""
    m = _mk("AutoencoderKLLTX2Audio", base_channels=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
            resolution=16, latent_channels=4, mid_block_add_attention=True, mel_bins=16)  # fmt: skip
    return m, {"sample": _r(1, 2, 16, 16)}


def consisid_face() -> tuple[torch.nn.Module, Inputs]:
    """ConsisID with the face extractor (is_train_face=True): PerceiverAttention in LocalFacialExtractor."""
    from diffusers import ConsisIDTransformer3DModel

    _seed()
    m = ConsisIDTransformer3DModel(
        num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=2, patch_size=2,
        temporal_compression_ratio=1, max_text_seq_length=5, is_train_face=True, cross_attn_interval=1,
        LFE_id_dim=8, LFE_vit_dim=16, LFE_depth=2, LFE_dim_head=8, LFE_num_heads=2, LFE_num_id_token=2,
        LFE_num_querie=4, LFE_output_dim=32, LFE_ff_mult=1, LFE_num_scale=2, cross_attn_dim_head=8,
        cross_attn_num_heads=2,
    ).eval()  # fmt: skip
    return m, {"hidden_states": _r(1, 2, 4, 8, 8), "encoder_hidden_states": _r(1, 5, 16),
               "timestep": torch.tensor([3]), "id_cond": _r(1, 8), "id_vit_hidden": [_r(1, 3, 16), _r(1, 3, 16)]}  # fmt: skip


def sd3_ip_adapter() -> tuple[torch.nn.Module, Inputs]:
    """SD3 with an IP-Adapter set up as `_load_ip_adapter_weights` does (random weights): the
    IPAdapterTimeImageProjection resampler (hand-written attention in IPAdapterTimeImageProjectionBlock)
    and SD3IPAdapterJointAttnProcessor2_0 at every joint attention."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    m, inputs = tiny.sd3()
    _seed()
    inner = m.config.attention_head_dim * m.config.num_attention_heads
    procs = {
        name: SD3IPAdapterJointAttnProcessor2_0(hidden_size=inner, ip_hidden_states_dim=inner,
                                                head_dim=m.config.attention_head_dim, timesteps_emb_dim=16)
        for name in m.attn_processors
    }  # fmt: skip
    m.set_attn_processor(procs)
    m.image_proj = IPAdapterTimeImageProjection(embed_dim=8, output_dim=inner, hidden_dim=16, depth=1, dim_head=8,
                                                heads=2, num_queries=4, ffn_ratio=1, timestep_in_dim=8).eval()  # fmt: skip
    b = inputs["hidden_states"].shape[0]
    return m.eval(), dict(inputs, joint_attention_kwargs=_KeepOnPop(ip_adapter_image_embeds=_r(b, 3, 8)))


class _KeepOnPop(dict):  # type: ignore[type-arg]
    """SD3's forward pops `ip_adapter_image_embeds` from `joint_attention_kwargs`; the coverage check runs
    the same inputs twice (untraced, traced), so the entry is read without being removed."""

    def pop(self, key: Any, *default: Any) -> Any:
        return self[key] if key in self else (default[0] if default else super().pop(key))


def unet_text_embed() -> tuple[torch.nn.Module, Inputs]:
    """UNet2DConditionModel with addition_embed_type='text' (TextTimeEmbedding's AttentionPooling)."""
    m = _mk("UNet2DConditionModel", sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            addition_embed_type="text", encoder_hid_dim=32, addition_embed_type_num_heads=4)  # fmt: skip
    return m, {"sample": _r(2, 4, 16, 16), "timestep": torch.tensor(10), "encoder_hidden_states": _r(2, 7, 32)}


def controlnet_text_embed() -> tuple[torch.nn.Module, Inputs]:
    """ControlNetModel with addition_embed_type='text' (TextTimeEmbedding's AttentionPooling)."""
    m = _mk("ControlNetModel", block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
            attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            conditioning_embedding_out_channels=(8, 16), norm_num_groups=8, addition_embed_type="text",
            encoder_hid_dim=32, addition_embed_type_num_heads=4)  # fmt: skip
    return m, {"sample": _r(2, 4, 16, 16), "timestep": torch.tensor(10), "encoder_hidden_states": _r(2, 7, 32),
               "controlnet_cond": _r(2, 3, 32, 32)}  # fmt: skip



CASES: dict[str, Builder] = {
    "UNet1DModel": unet1d,
    "AutoencoderKLLTX2Audio": ltx2_audio_vae_attn,
    "UNet2DConditionModel": tiny.sd15_unet,
    "SD3Transformer2DModel": tiny.sd3,
    "FluxTransformer2DModel": tiny.flux,
    "PixArtTransformer2DModel": tiny.pixart,
    "WanTransformer3DModel": tiny.wan,
    "UNet2DModel": unet2d,
    "VQModel": vq,
    "AutoencoderKL": autoencoder_kl,
    "AsymmetricAutoencoderKL": asym_kl,
    "DiTTransformer2DModel": dit,
    "Transformer2DModel": transformer2d,
    "SanaTransformer2DModel": sana,
    "ControlNetModel": controlnet,
    "SD3ControlNetModel": sd3_controlnet,
    "FluxControlNetModel": flux_controlnet,
    "PriorTransformer": prior,
    "AuraFlowTransformer2DModel": auraflow,
    "CogVideoXTransformer3DModel": cogvideox,
    "HunyuanDiT2DModel": hunyuan_dit,
    "LTXVideoTransformer3DModel": ltx,
    "UNet3DConditionModel": unet3d,
    "Lumina2Transformer2DModel": lumina2,
    "MochiTransformer3DModel": mochi,
    "LatteTransformer3DModel": latte,
    "AllegroTransformer3DModel": allegro,
    "HunyuanVideoTransformer3DModel": hunyuan_video,
    "CogView3PlusTransformer2DModel": cogview3,
    "CogView4Transformer2DModel": cogview4,
    "QwenImageTransformer2DModel": qwen_image,
    "ChromaTransformer2DModel": chroma,
    "SkyReelsV2Transformer3DModel": skyreels,
    "StableAudioDiTModel": stable_audio,
    "SanaControlNetModel": sana_controlnet,
    "AutoencoderKLTemporalDecoder": temporal_decoder_vae,
    "AutoencoderKLFlux2": flux2_vae,
    "UNetMotionModel": unet_motion,
    "TransformerTemporalModel": transformer_temporal,
    "UNetSpatioTemporalConditionModel": unet_svd,
    "BriaTransformer2DModel": bria,
    "OvisImageTransformer2DModel": ovis,
    "LongCatImageTransformer2DModel": longcat,
    "Flux2Transformer2DModel": flux2,
    "WanVACETransformer3DModel": wan_vace,
    "I2VGenXLUNet": i2vgen,
    "QwenImageControlNetModel": qwen_controlnet,
    "ChronoEditTransformer3DModel": chronoedit,
    "UNetControlNetXSModel": controlnet_xs,
    "HunyuanDiT2DControlNetModel": hunyuan_dit_controlnet,
    "ConsisIDTransformer3DModel": consisid,
    "HiDreamImageTransformer2DModel": hidream,
    "OmniGenTransformer2DModel": omnigen,
    "LuminaNextDiT2DModel": lumina_next,
    "EasyAnimateTransformer3DModel": easyanimate,
    "CosmosTransformer3DModel": cosmos,
    "StableCascadeUNet": stable_cascade,
    "UVit2DModel": uvit2d,
    "Kandinsky3UNet": kandinsky3,
    "SparseControlNetModel": sparse_controlnet,
    "T5FilmDecoder": t5_film,
    "SanaVideoTransformer3DModel": sana_video,
    "WanAnimateTransformer3DModel": wan_animate,
    "ZImageTransformer2DModel": zimage,
    "ZImageControlNetModel": zimage_controlnet,
    "MultiControlNetModel": multi_controlnet,
    "SD3MultiControlNetModel": sd3_multi_controlnet,
    "FluxMultiControlNetModel": flux_multi_controlnet,
    "QwenImageMultiControlNetModel": qwen_multi_controlnet,
    "HunyuanDiT2DMultiControlNetModel": hunyuan_multi_controlnet,
    "HunyuanImageTransformer2DModel": hunyuan_image,
    "LTX2VideoTransformer3DModel": ltx2,
    "Kandinsky6Transformer3DModel": kandinsky6,
    "Kandinsky5Transformer3DModel": kandinsky5,
    "Ideogram4Transformer2DModel": ideogram4,
    "QwenImage21Transformer2DModel": qwen_image21,
    "StableAudio3DiTModel": stable_audio3,
    "AutoencoderKLAllegro": allegro_vae,
    "AutoencoderKLCosmos": cosmos_vae,
    "AutoencoderKLHunyuanVideo": hunyuan_video_vae,
    "AutoencoderKLMochi": mochi_vae,
    "ConsistencyDecoderVAE": consistency_vae,
    "AutoencoderSAME": same_vae,
    "AutoencoderKLMiniMaxH3": minimax_h3_vae,
    "AutoencoderRAE": rae,
    "AudioLDM2UNet2DConditionModel": audioldm2_unet,
    "DreamLiteUNetModel": dreamlite_unet,
    "DreamLiteTransformer2DModel": dreamlite_transformer,
    "ControlNetUnionModel": controlnet_union,
    "UniDiffuserModel": unidiffuser,
    "BriaFiboTransformer2DModel": bria_fibo,
    "ErnieImageTransformer2DModel": ernie_image,
    "GlmImageTransformer2DModel": glm_image,
    "HunyuanVideo15Transformer3DModel": hunyuan_video15,
    "HunyuanVideoFramepackTransformer3DModel": framepack,
    "Krea2Transformer2DModel": krea2,
    "AnyFlowTransformer3DModel": anyflow,
    "HeliosTransformer3DModel": helios,
    "MotifVideoTransformer3DModel": motif_video,
    "NucleusMoEImageTransformer2DModel": nucleus_moe,
    "PRXTransformer2DModel": prx,
    "MiniMaxH3Transformer3DModel": minimax_h3,
    "AnyFlowFARTransformer3DModel": anyflow_far,
    "JoyImageEditTransformer3DModel": joyimage_edit,
    "JoyImageEditPlusTransformer3DModel": joyimage_edit_plus,
    "Kandinsky6SRTransformer3DModel": kandinsky6_sr,
    "LongCatAudioDiTTransformer": longcat_audio,
    "SanaWMTransformer3DModel": sana_wm,
    "AceStepTransformer1DModel": ace_step,
    "AceStepAudioTokenDetokenizer": ace_detokenizer,
    "AceStepAudioTokenizer": ace_tokenizer,
    "AnimaTextConditioner": anima,
    "MiniMaxMusic3Transformer1DModel": minimax_music3,
    "MiniMaxMusic3RVQDepthDecoder": minimax_rvq_depth,
    "BriaFibo2Transformer2DModel": bria_fibo2,
    "SanaWMLTX2RefinerTransformer3DModel": sana_wm_refiner,
    "AutoencoderKLWan": wan_vae,
    "AutoencoderKLQwenImage": qwen_vae,
    "AutoencoderKLQwenImage21": qwen21_vae,
    "AutoencoderKLHunyuanVideo15": hunyuan_video15_vae,
    "AutoencoderKLHunyuanImageRefiner": hunyuan_image_refiner_vae,
    "AutoencoderKLHunyuanImage": hunyuan_image_vae,
    "AutoencoderVidTok": vidtok,
    "UniDiffuserTextDecoder": unidiffuser_text_decoder,
    "AutoencoderKLKVAEAudio": kvae_audio,
    "AutoencoderKLMiniMaxH3Audio": minimax_h3_audio,
    "MMAudioVAE": mmaudio_vae,
    "WanAnimate2Transformer3DModel": wan_animate2,
    "LTX2VideoDiffusionDecoderModel": ltx2_diffusion_decoder,
    "Flux3Transformer2DModel": flux3,
    "Cosmos3OmniTransformer": cosmos3,
    "AceStepConditionEncoder": ace_condition_encoder,
    "RFD4ProteinaTransformer": rfd4_proteina,
    "AutoencoderDC": autoencoder_dc,
}

#: Extra variants exercising adapters/processors on an already-covered class.
VARIANTS: dict[str, Builder] = {
    "UNet2DConditionModel[sdxl]": tiny.sdxl_unet,
    "UNet2DConditionModel[classic]": tiny.classic_unet,
    "WanTransformer3DModel[i2v]": lambda: tiny.wan(i2v=True),
    "QwenImage21Transformer2DModel[flex]": lambda: qwen_image21(flex=True),
    # Hand-written attention outside the default config (torch-manual adapter).
    "ConsisIDTransformer3DModel[face]": consisid_face,
    "UNet2DConditionModel[text]": unet_text_embed,
    "ControlNetModel[text]": controlnet_text_embed,
    "SD3Transformer2DModel[ip_adapter]": sd3_ip_adapter,
}


def run(model: torch.nn.Module, inputs: Inputs) -> torch.Tensor:
    """One forward without grad; the first output tensor (the `.sample` for VAEs)."""
    # A few classes (UVit2DModel, T5FilmDecoder) return a tensor and take no `return_dict`.
    extra = {"return_dict": False} if "return_dict" in inspect.signature(model.forward).parameters else {}
    with torch.no_grad():
        torch.manual_seed(0)  # models that sample noise in forward (ConsistencyDecoderVAE) then repeat exactly
        out = model(**inputs, **extra)
    while isinstance(out, (tuple, list, dict)):  # ZImageControlNetModel returns {layer index: hints}
        out = out[0] if not isinstance(out, dict) else next(iter(out.values()))
    if not isinstance(out, torch.Tensor):
        out = getattr(out, "sample", out)
    return out

#: Classes whose attention (or part of it) runs outside any processor, found by scanning diffusers
#: 0.42.1's sources; traced through the plain-PyTorch adapter (F.sdpa in a plain module,
#: nn.MultiheadAttention) or the transformers adapter (a transformers model inside). All are in CASES.
OUTSIDE_PROCESSOR: dict[str, str] = {
    "AutoencoderKLWan": "WanAttentionBlock calls F.sdpa",
    "AutoencoderKLQwenImage": "QwenImageAttentionBlock calls F.sdpa",
    "AutoencoderKLQwenImage21": "QwenImage21AttentionBlock calls F.sdpa",
    "AutoencoderKLHunyuanImage": "HunyuanImageAttentionBlock calls F.sdpa",
    "AutoencoderKLHunyuanImageRefiner": "HunyuanImageRefinerAttnBlock calls F.sdpa",
    "AutoencoderKLHunyuanVideo15": "HunyuanVideo15AttnBlock calls F.sdpa",
    "AutoencoderVidTok": "VidTokAttnBlock calls F.sdpa in its `attention` helper method",
    "SanaWMTransformer3DModel": "SanaWMSoftmaxAttention / SanaWMSoftmaxCamAttention call F.sdpa (in bfloat16)",
    "MochiTransformer3DModel": "MochiAttentionPool (embeddings) calls F.sdpa",
    "UNet1DModel": "SelfAttention1d computes softmax(QK^T)V by hand (torch-manual adapter)",
    "ControlNetUnionModel": "ResidualAttentionBlock uses nn.MultiheadAttention",
    "UniDiffuserTextDecoder": "a transformers GPT-2 inside (transformers adapter)",
    "AutoencoderRAE": "a transformers DINOv2 encoder inside (transformers adapter)",
}

#: Classes with attention that have no case, and why.
NOT_BUILT: dict[str, str] = {
    "ControlNetXSAdapter": "weights only (its forward raises): the attention runs inside UNetControlNetXSModel, "
    "which is covered (built from a UNet and this adapter's config)",
    "MotionAdapter": "weights only (no forward of its own): its motion modules run inside UNetMotionModel, "
    "which is covered",
    "CosmosControlNetModel": "its forward always resizes the padding mask with torchvision, which is not a "
    "test dependency; its blocks are CosmosTransformer3DModel's (covered)",
    "RFD4ProteinaAutoencoder": "needs residue/atom37 topology tables as config; its attention processor "
    "(RFD4ProteinaPairAttnProcessor) is covered through RFD4ProteinaTransformer",
}


#: Attention written by hand (softmax(QK^T)V inline: no processor, no F.sdpa, no nn.MultiheadAttention),
#: found by scanning diffusers 0.42.1's sources, traced by the torch-manual adapter (it catches the softmax,
#: the score product and the product with the values). Class -> where, and the case that checks it.
HAND_WRITTEN_TRACED: dict[str, str] = {
    "UNet1DModel": "SelfAttention1d in AttnDownBlock1D / AttnUpBlock1D / UNetMidBlock1D (default config); "
    "case UNet1DModel",
    "AutoencoderKLLTX2Audio": "LTX2AudioAttnBlock, only with attn_resolutions or mid_block_add_attention (none at "
    "the default config; single head, `bmm(v, probsᵀ)`); case AutoencoderKLLTX2Audio builds it with both",
    "ConsisIDTransformer3DModel": "PerceiverAttention / PerceiverCrossAttention of the face extractor "
    "(is_train_face=True); case ConsisIDTransformer3DModel[face]",
    "UNet2DConditionModel": "AttentionPooling of TextTimeEmbedding (addition_embed_type='text'); case "
    "UNet2DConditionModel[text]",
    "ControlNetModel": "AttentionPooling of TextTimeEmbedding (addition_embed_type='text'); case ControlNetModel[text]",
    "SD3Transformer2DModel": "IPAdapterTimeImageProjectionBlock of the IP-Adapter resampler (once an IP-Adapter is "
    "loaded): it computes the attention with the projections of a child diffusers `Attention` whose processor "
    "never runs; case SD3Transformer2DModel[ip_adapter]",
}

#: Hand-written attention no case checks yet. Class -> where, and why.
HAND_WRITTEN: dict[str, str] = {}


def _no_attention() -> dict[str, Callable[[], torch.nn.Module]]:
    """Classes whose default config does not build, built tiny here to show they hold no attention at all."""
    import diffusers

    def multi_adapter() -> torch.nn.Module:
        return diffusers.MultiAdapter([diffusers.T2IAdapter(channels=[8, 16], num_res_blocks=1, downscale_factor=4)] * 2)

    return {
        "AudioLDM2ProjectionModel": lambda: diffusers.AudioLDM2ProjectionModel(8, 8, 8),
        "StableAudioProjectionModel": lambda: diffusers.StableAudioProjectionModel(8, 8, 0.0, 10.0),
        "MultiAdapter": multi_adapter,
    }


NO_ATTENTION = _no_attention

