"""Tiny random-weight transformers models whose attention is hand-written (softmax inline), from configs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

V = 50  # vocabulary size


def _ids(b: int = 2, n: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, V, (b, n), generator=torch.Generator().manual_seed(seed))


def _mask(b: int = 2, n: int = 7) -> torch.Tensor:
    m = torch.ones(b, n, dtype=torch.long)
    m[1, -2:] = 0  # padding in the second sequence
    return m


def deberta_v2() -> tuple[torch.nn.Module, dict[str, Any]]:
    from transformers import DebertaV2Config, DebertaV2Model

    cfg = DebertaV2Config(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=16, position_buckets=8,
    )  # fmt: skip
    return DebertaV2Model(cfg), {"input_ids": _ids(), "attention_mask": _mask()}


def bloom() -> tuple[torch.nn.Module, dict[str, Any]]:
    from transformers import BloomConfig, BloomModel

    cfg = BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4)
    return BloomModel(cfg), {"input_ids": _ids(), "attention_mask": _mask()}


def _falcon(alibi: bool) -> tuple[torch.nn.Module, dict[str, Any]]:
    from transformers import FalconConfig, FalconModel

    # Without alibi: multi-query (one key/value head shared by all); with alibi: one per head.
    cfg = FalconConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=alibi,
        multi_query=not alibi, attn_implementation="eager",
    )  # fmt: skip
    return FalconModel(cfg), {"input_ids": _ids(), "attention_mask": _mask()}


def falcon() -> tuple[torch.nn.Module, dict[str, Any]]:
    return _falcon(False)


def falcon_alibi() -> tuple[torch.nn.Module, dict[str, Any]]:
    return _falcon(True)


def gpt_neo() -> tuple[torch.nn.Module, dict[str, Any]]:
    from transformers import GPTNeoConfig, GPTNeoModel

    cfg = GPTNeoConfig(
        vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        max_position_embeddings=64, window_size=4, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPTNeoModel(cfg), {"input_ids": _ids(), "attention_mask": _mask()}


def mpnet() -> tuple[torch.nn.Module, dict[str, Any]]:
    from transformers import MPNetConfig, MPNetModel

    cfg = MPNetConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    return MPNetModel(cfg), {"input_ids": _ids(), "attention_mask": _mask()}


def xlnet() -> tuple[torch.nn.Module, dict[str, Any]]:
    from transformers import XLNetConfig, XLNetModel

    cfg = XLNetConfig(vocab_size=V, d_model=32, n_layer=2, n_head=4, d_inner=37)
    return XLNetModel(cfg), {"input_ids": _ids(), "attention_mask": _mask()}


def led() -> tuple[torch.nn.Module, dict[str, Any]]:
    from transformers import LEDConfig, LEDModel

    cfg = LEDConfig(
        vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, attention_window=4,
        max_encoder_position_embeddings=64, max_decoder_position_embeddings=64,
    )  # fmt: skip
    return LEDModel(cfg), {"input_ids": _ids(n=8), "decoder_input_ids": _ids(n=5, seed=2)}


def longformer() -> tuple[torch.nn.Module, dict[str, Any]]:
    from transformers import LongformerConfig, LongformerModel

    cfg = LongformerConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
        attention_window=4, max_position_embeddings=64,
    )  # fmt: skip
    return LongformerModel(cfg), {"input_ids": _ids(n=8)}


def blip() -> tuple[torch.nn.Module, dict[str, Any]]:
    from transformers import BlipConfig, BlipForConditionalGeneration

    cfg = BlipConfig(
        text_config={"vocab_size": V, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "intermediate_size": 37, "encoder_hidden_size": 32},
        vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "intermediate_size": 37, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return BlipForConditionalGeneration(cfg), {"pixel_values": pixels, "input_ids": _ids(), "attention_mask": _mask()}


def sam_vision() -> tuple[torch.nn.Module, dict[str, Any]]:
    from transformers import SamVisionConfig, SamVisionModel

    cfg = SamVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
        output_channels=16, window_size=2, global_attn_indexes=[1], mlp_dim=37, use_rel_pos=True,
        initializer_range=0.02, attn_implementation="eager",
    )  # fmt: skip
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model = SamVisionModel(cfg)
    _sharpen_sam(model.vision_encoder)
    return model, {"pixel_values": pixels}


def sam() -> tuple[torch.nn.Module, dict[str, Any]]:
    """The whole SAM: hand-written vision attention, registry attention in the mask decoder."""
    from transformers import SamConfig, SamModel

    cfg = SamConfig(
        vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32,
                       "patch_size": 8, "output_channels": 32, "window_size": 2, "global_attn_indexes": [1],
                       "mlp_dim": 37, "use_rel_pos": True, "initializer_range": 0.02, "num_pos_feats": 16},
        prompt_encoder_config={"hidden_size": 32, "image_size": 32, "patch_size": 8, "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_dim": 32,
                             "iou_head_hidden_dim": 16},
        attn_implementation="eager",
    )  # fmt: skip
    model = SamModel(cfg)
    _sharpen_sam(model.vision_encoder)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return model, {"pixel_values": pixels, "input_points": torch.tensor([[[[10.0, 12.0]]]])}


def _sharpen_sam(encoder: torch.nn.Module) -> None:
    with torch.no_grad():  # SAM's init gives near-uniform attention and zero relative positions
        for layer in encoder.layers:
            layer.attn.qkv.weight.normal_(0, 0.3)
            layer.attn.rel_pos_h.normal_(0, 0.5)
            layer.attn.rel_pos_w.normal_(0, 0.5)


def reformer() -> tuple[torch.nn.Module, dict[str, Any]]:
    from transformers import ReformerConfig, ReformerModel

    cfg = ReformerConfig(
        vocab_size=V, hidden_size=32, num_attention_heads=2, attention_head_size=16, feed_forward_size=37,
        attn_layers=["local", "lsh"], axial_pos_embds=False, max_position_embeddings=64, local_attn_chunk_length=4,
        lsh_attn_chunk_length=4, num_buckets=2, is_decoder=False,
    )  # fmt: skip
    return ReformerModel(cfg), {"input_ids": _ids(n=8)}


def _bigbird_pegasus(kind: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    from transformers import BigBirdPegasusConfig, BigBirdPegasusModel

    cfg = BigBirdPegasusConfig(
        vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, attention_type=kind,
        max_position_embeddings=64, block_size=2, num_random_blocks=1, attn_implementation="eager",
    )  # fmt: skip
    return BigBirdPegasusModel(cfg), {"input_ids": _ids(n=8), "decoder_input_ids": _ids(n=5, seed=2)}


def bigbird_pegasus() -> tuple[torch.nn.Module, dict[str, Any]]:
    return _bigbird_pegasus("original_full")


def bigbird_pegasus_sparse() -> tuple[torch.nn.Module, dict[str, Any]]:
    return _bigbird_pegasus("block_sparse")


FAMILIES: dict[str, Callable[[], tuple[torch.nn.Module, dict[str, Any]]]] = {
    "deberta_v2": deberta_v2,
    "bloom": bloom,
    "falcon": falcon,
    "falcon_alibi": falcon_alibi,
    "gpt_neo": gpt_neo,
    "mpnet": mpnet,
    "xlnet": xlnet,
    "led": led,
    "blip": blip,
    "sam_vision": sam_vision,
    "sam": sam,
    "bigbird_pegasus": bigbird_pegasus,
}
#: Families whose attention is listed but refused at attach (site pattern -> refused).
REFUSED: dict[str, Callable[[], tuple[torch.nn.Module, dict[str, Any]]]] = {
    "longformer": longformer,
    "reformer": reformer,
    "bigbird_pegasus_sparse": bigbird_pegasus_sparse,
}


def build(name: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A tiny eval-mode model of family `name` and its inputs (deterministic weights)."""
    torch.manual_seed(0)
    model, inputs = {**FAMILIES, **REFUSED, **SMOKE}[name]()
    return model.eval(), inputs


def sew_d() -> tuple[torch.nn.Module, dict[str, Any]]:
    from transformers import SEWDConfig, SEWDModel

    cfg = SEWDConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, squeeze_factor=1,
        conv_dim=(8, 8), conv_stride=(4, 4), conv_kernel=(8, 8), num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, position_buckets=8, max_position_embeddings=64,
    )  # fmt: skip
    return SEWDModel(cfg), {"input_values": torch.randn(2, 400, generator=torch.Generator().manual_seed(4))}


def squeezebert() -> tuple[torch.nn.Module, dict[str, Any]]:
    """The softmax is an `nn.Softmax` submodule; q/k/v are grouped 1x1 convolutions over (B, C, L)."""
    from transformers import SqueezeBertConfig, SqueezeBertModel

    cfg = SqueezeBertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=38,
        embedding_size=32, q_groups=2, k_groups=2, v_groups=2, post_attention_groups=2, intermediate_groups=2,
        output_groups=2,
    )  # fmt: skip
    return SqueezeBertModel(cfg), {"input_ids": _ids(), "attention_mask": _mask()}


FAMILIES["sew_d"] = sew_d
FAMILIES["squeezebert"] = squeezebert


def _text(config_cls: str, model_cls: str, **kw: Any) -> Callable[[], tuple[torch.nn.Module, dict[str, Any]]]:
    def make() -> tuple[torch.nn.Module, dict[str, Any]]:
        import transformers

        cfg = getattr(transformers, config_cls)(vocab_size=V, **kw)
        return getattr(transformers, model_cls)(cfg), {"input_ids": _ids(), "attention_mask": _mask()}

    return make


def swinv2() -> tuple[torch.nn.Module, dict[str, Any]]:
    from transformers import Swinv2Config, Swinv2Model

    cfg = Swinv2Config(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4)
    return Swinv2Model(cfg), {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))}


_BERTISH = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37}
#: More hand-written families, checked for transparency and probs only (no per-family edit reference).
SMOKE: dict[str, Callable[[], tuple[torch.nn.Module, dict[str, Any]]]] = {
    "openai": _text("OpenAIGPTConfig", "OpenAIGPTModel", n_embd=32, n_layer=2, n_head=4),
    "xlm": _text("XLMConfig", "XLMModel", emb_dim=32, n_layers=2, n_heads=4),
    "roformer": _text("RoFormerConfig", "RoFormerModel", embedding_size=32, **_BERTISH),
    "megatron_bert": _text("MegatronBertConfig", "MegatronBertModel", **_BERTISH),
    "funnel": _text("FunnelConfig", "FunnelModel", d_model=32, n_head=4, d_head=8, d_inner=37, block_sizes=[1, 1],
                    num_decoder_layers=1),
    "xglm": _text("XGLMConfig", "XGLMModel", d_model=32, num_layers=2, attention_heads=4, ffn_dim=37),
    "mpt": _text("MptConfig", "MptModel", d_model=32, n_layers=2, n_heads=4),
    "convbert": _text("ConvBertConfig", "ConvBertModel", embedding_size=32, **_BERTISH),
    "rembert": _text("RemBertConfig", "RemBertModel", input_embedding_size=16, output_embedding_size=16, **_BERTISH),
    "swinv2": swinv2,
}  # fmt: skip
