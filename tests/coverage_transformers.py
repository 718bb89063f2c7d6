"""Tiny builders for every transformers model family, discovered from the installed release (tests only).

`families()` lists every model type in `CONFIG_MAPPING_NAMES` with its config class and base model
class (`MODEL_MAPPING_NAMES`, else the first task mapping that has one). `tiny_config(model_type)`
shrinks the default config generically: the common size fields (hidden size, layers, heads, FFN,
vocabulary, image/patch size, experts...) are set to tiny values, recursively in sub-configs, and the
config is rebuilt through its constructor so derived fields (layer types, head dims) follow. A few
families get hand-written overrides in `OVERRIDES` where the generic path fails and the fix is cheap.
`make_inputs(model)` builds forward inputs from the forward signature and `main_input_name`: token ids
with a padded attention mask, pixel values, audio features, decoder ids.

`build(model_type, impl)` -> `Built(model, inputs)` or raises `NotBuilt(reason)`.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass
from typing import Any

import torch

B, L, DEC_L = 2, 8, 4
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 32, 4, 2, 8, 64, 2
VOCAB = 512
MAX_PARAMS = 25_000_000  # after shrinking; bigger means the shrinker missed a size field

# Generic size fields: name -> tiny value (applied only where the config has the field).
_INT_FIELDS: dict[str, int] = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "embed_dim", "dim", "hidden_dim_model",
                     "projection_dim", "projection_size", "projector_hidden_size", "text_hidden_size",
                     "vision_hidden_size", "d_embed", "word_embed_proj_dim", "embedding_size", "audio_hidden_size",
                     "encoder_hidden_size", "decoder_hidden_size", "hidden_dim",
                     # widths a validator ties to the hidden size (codec quantizers, flow heads, vision outputs)
                     "codebook_dim", "condition_dim", "out_hidden_size"), HIDDEN),
    **dict.fromkeys(("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers",
                     "decoder_layers", "num_decoder_layers", "num_encoder_layers", "depth",
                     "num_text_layers", "num_vision_layers", "text_layers", "vision_layers",
                     "num_audio_layers"), LAYERS),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
                     "decoder_attention_heads", "attention_heads", "num_attention_heads_text"), HEADS),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num",
                     "num_key_value_groups_total"), KV_HEADS),
    **dict.fromkeys(("head_dim", "d_kv", "kv_channels", "attention_head_size", "qk_nope_head_dim",
                     "qk_rope_head_dim", "v_head_dim", "qk_head_dim", "linear_key_head_dim",
                     "linear_value_head_dim", "attention_head_dim"), HEAD_DIM),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "d_ff", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim",
                     "moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size",
                     "dense_intermediate_size", "ffn_hidden_size", "mlp_dim", "intermediate_dim",
                     "hidden_dim_ffn"), FFN),
    **dict.fromkeys(("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts",
                     "num_experts_total"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts",
                     "moe_k"), 2),
    **dict.fromkeys(("n_group", "topk_group", "n_shared_experts", "num_shared_experts"), 1),
    **dict.fromkeys(("q_lora_rank", "kv_lora_rank"), 16),
    **dict.fromkeys(("emb_dim", "entity_emb_size", "d_latents", "hidden_size_per_layer_input"), HIDDEN),
    "entity_vocab_size": 64,
    "vocab_size_per_layer_input": VOCAB,
    "num_latents": 8,
    "rotary_dim": HEAD_DIM // 2,
    "max_source_positions": 16,  # Whisper-style encoders take exactly 2x this many feature frames
    "num_frames": 2,
    # State-space / linear-attention mixers of hybrid stacks (their slow CPU paths scale with these).
    **dict.fromkeys(("mamba_n_heads", "linear_num_heads", "linear_num_key_heads", "linear_num_value_heads"), 8),
    **dict.fromkeys(("mamba_d_state", "ssm_state_size", "state_size", "mamba_d_ssm_per_head"), 16),
    **dict.fromkeys(("mamba_chunk_size", "chunk_size"), 8),
    **dict.fromkeys(("mamba_d_ssm",), 64),
    **dict.fromkeys(("mamba_d_head", "linear_head_dim", "mamba_head_dim"), 8),
    "image_size": 32,
    "patch_size": 8,
    "num_channels": 3,
    "vocab_size": VOCAB,
    "sliding_window": 4,
    "attention_window": 4,  # Longformer/LED: L is a multiple, so inputs are not padded (attentions keep L)
}
# Fields that hold per-layer lists: truncated to LAYERS entries.
_LAYER_LISTS = ("layer_types", "block_types", "attention_types", "layers_block_type", "mlp_only_layers")


class NotBuilt(Exception):
    """The family could not be built tiny; the message is the one-line reason."""


@dataclass
class Family:
    model_type: str
    config_cls: type | None
    model_cls: type | None
    reason: str = ""


@functools.cache
def families() -> dict[str, Family]:
    """Every model type of the installed transformers -> its config and base model class (or why none)."""
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    mappings = [modeling_auto.MODEL_MAPPING_NAMES] + [
        getattr(modeling_auto, n)
        for n in sorted(dir(modeling_auto))
        if n.startswith("MODEL_FOR_") and n.endswith("_MAPPING_NAMES")
    ]
    out: dict[str, Family] = {}
    for mt, cfg_name in CONFIG_MAPPING_NAMES.items():
        cls_name = None
        for mapping in mappings:
            v = mapping.get(mt)
            if v:
                cls_name = v if isinstance(v, str) else v[0]
                break
        out[mt] = Family(mt, None, None)
        if cls_name is None:
            out[mt].reason = "no model class in the auto mappings (a sub-model config of another family)"
            continue
        try:
            import transformers

            out[mt].config_cls = getattr(transformers, cfg_name)
            out[mt].model_cls = getattr(transformers, cls_name)
        except Exception as exc:  # an optional dependency missing
            out[mt].reason = f"import failed: {type(exc).__name__}: {_short(exc)}"
    return out


def _short(exc: BaseException, n: int = 120) -> str:
    return " ".join(str(exc).split())[:n]


def _fields(cls: type) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(cls.__init__).parameters)


def _shrink_value(key: str, default: Any, tiny: int) -> Any:
    if default is None and key == "head_dim":
        return tiny  # "derive from hidden_size" is not honoured everywhere (Ministral reads it as is)
    if isinstance(default, bool) or default is None or default == 0:
        return default  # 0 switches a part off (GLM-5 Next's NoPE attention: qk_rope_head_dim=0)
    if isinstance(default, int):
        return tiny
    if isinstance(default, float) and key in _INT_FIELDS:
        return default
    if isinstance(default, (list, tuple)) and default and all(isinstance(x, int) for x in default):
        return type(default)([tiny] * len(default))
    return default


def _per_layer_value(field: str, value: Any) -> Any:
    if not isinstance(value, int) or isinstance(value, bool):
        return value
    if field.endswith("head_dim"):
        return 2 * HEAD_DIM
    return _INT_FIELDS.get(field, value)


def shrink(config_cls: type, default: Any, depth: int = 0) -> dict[str, Any]:
    """Constructor kwargs that make `config_cls` tiny (recursing into sub-configs)."""
    fields = _fields(config_cls)
    d = default.to_dict() if default is not None else {}
    kw: dict[str, Any] = {}
    for key, tiny in _INT_FIELDS.items():
        if key in fields and key in d:
            new = _shrink_value(key, d[key], tiny)
            if new is not d[key] and new != d[key]:
                kw[key] = new
    # Head counts must divide the hidden size; keep kv heads <= heads.
    if kw.get("num_key_value_heads") and d.get("num_key_value_heads") == d.get("num_attention_heads"):
        kw["num_key_value_heads"] = kw.get("num_attention_heads", HEADS)
    for key in ("depths", "encoder_layers_per_stage", "num_layers_per_stage"):
        if isinstance(d.get(key), (list, tuple)) and key in fields:
            kw[key] = [1] * len(d[key])
    for key in _LAYER_LISTS:
        if isinstance(d.get(key), (list, tuple)) and d[key] and key in fields:
            # Keep one layer of every type (hybrid attention/mamba stacks need their attention layer).
            kinds = list(dict.fromkeys(map(str, d[key])))
            picked = [next(x for x in d[key] if str(x) == k) for k in kinds]
            picked += list(d[key])[len(picked):LAYERS]
            kw[key] = picked
            for n in ("num_hidden_layers", "num_layers", "n_layer", "n_layers"):
                if n in kw:
                    kw[n] = len(picked)
            plc = d.get("per_layer_config")
            if isinstance(plc, dict):
                # Per-layer overrides (Gemma 4: a bigger head dim on full-attention layers) follow the kept
                # layer of the same type; their sizes stay distinct from the default ones but tiny.
                new: dict[str, Any] = {}
                for k, v in plc.items():
                    j = kinds.index(str(d[key][int(k)]))
                    if isinstance(v, dict):
                        v = {f: _per_layer_value(f, x) for f, x in v.items()}
                        was = plc[k]
                        heads = was.get("num_attention_heads")
                        if heads is not None and was.get("num_key_value_heads") == heads:
                            v["num_key_value_heads"] = v["num_attention_heads"]  # full multi-head layers stay so
                    new[f"{j:02d}"] = v
                kw["per_layer_config"] = new
    # Rope sections must add up to half the (new) head dim.
    for key in ("rope_parameters", "rope_scaling"):
        rp = d.get(key)
        if isinstance(rp, dict) and key in fields:
            rp = dict(rp)
            for sk in ("mrope_section", "section"):
                if isinstance(rp.get(sk), list) and rp[sk]:
                    n = len(rp[sk])
                    half = HEAD_DIM // 2
                    rp[sk] = [half - (n - 1)] + [1] * (n - 1)
            kw[key] = rp
    if "mrope_section" in (getattr(config_cls, "ignore_keys_at_rope_validation", None) or ()):
        key = "rope_parameters"
        if key in fields:
            rp = dict(kw.get(key) or d.get(key) or {"rope_type": "default", "rope_theta": 10000.0})
            rp.setdefault("mrope_section", [HEAD_DIM // 2 - 2, 1, 1])
            kw[key] = rp
    # Other per-layer lists (Gemma 3n's intermediate sizes, activation sparsity...) follow the layer count.
    old_n, new_n = d.get("num_hidden_layers"), kw.get("num_hidden_layers")
    if isinstance(old_n, int) and isinstance(new_n, int) and old_n > new_n:
        for k, v in d.items():
            if k in fields and k not in _LAYER_LISTS and isinstance(v, list) and len(v) == old_n:
                kw[k] = list(kw.get(k, v))[:new_n]
    # Backbone configs name their output stages; with fewer layers the defaults point past the end.
    # Keep as many outputs as before (necks expect that many), one per layer.
    n_out = len(d.get("out_features") or [])
    if "out_features" in d and "num_hidden_layers" in kw and n_out:
        kw["num_hidden_layers"] = max(LAYERS, n_out)
        kw["out_indices"] = list(range(kw["num_hidden_layers"] - n_out + 1, kw["num_hidden_layers"] + 1))
        kw["out_features"] = None
        kw.pop("stage_names", None)
    # Special token ids must stay inside the tiny vocabulary.
    if "vocab_size" in kw:
        ids = [v for k, v in d.items() if k.endswith(("_token_id", "_token_index")) and isinstance(v, int)]
        if any(i >= VOCAB for i in ids):
            kw["vocab_size"] = max(ids) + 1 if max(ids) < 300_000 else d["vocab_size"]
    # Sub-configs: shrink recursively, passed as dicts (every composite config accepts those).
    if depth < 3:
        for sub in getattr(config_cls, "sub_configs", {}) or {}:
            sub_default = getattr(default, sub, None)
            if sub_default is None or not hasattr(sub_default, "to_dict"):
                continue
            sub_cls = type(sub_default)
            sub_kw = shrink(sub_cls, sub_default, depth + 1)
            sd = sub_default.to_dict()
            for drop in ("transformers_version", "architectures", "_name_or_path"):
                sd.pop(drop, None)
            sd.update(sub_kw)
            # Fields the sub-config derives in its constructor (Parakeet's kv heads from the head count) are
            # not constructor arguments: dropped so they are derived again from the tiny values.
            sub_fields = _fields(sub_cls)
            for k in [k for k in sd if k in _INT_FIELDS and k not in sub_fields and k not in sub_kw]:
                del sd[k]
            if sd.get("out_features") is None:
                sd.pop("out_features", None)
                sd.pop("stage_names", None)
            kw[sub] = sd
    return kw


# Hand-written where the generic shrinker fails and the fix is one line. Hybrid stacks whose default layout
# puts no attention layer in the first LAYERS layers get one.
OVERRIDES: dict[str, dict[str, Any]] = {
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"]},
    "mamba2": {"num_heads": 8},
    # Block-sparse attention needs L > (5 + 2·random blocks)·block_size, else the model switches to full.
    "big_bird": {"block_size": 1, "num_random_blocks": 1},
    "bigbird_pegasus": {"block_size": 1, "num_random_blocks": 1},
}
# DETR family. Two-stage detectors pick their top `num_queries` encoder tokens: at 32 px there are fewer
# than the default 300. Models with a timm backbone by default get transformers' own ResNet instead (timm
# is not installed), with the stages their feature levels read.
_FEW_QUERIES = {"num_queries": 4}
_RESNET = {
    "use_timm_backbone": False, "use_pretrained_backbone": False, "num_queries": 4,
    "backbone_config": {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 8, 8, 8],
                        "depths": [1, 1, 1, 1], "out_features": ["stage2", "stage3", "stage4"]},
}  # fmt: skip
OVERRIDES.update(dict.fromkeys(("rt_detr", "rt_detr_v2", "d_fine", "deimv2", "grounding-dino", "mm-grounding-dino",
                                "rf_detr"), _FEW_QUERIES))  # fmt: skip
# Reformer: axial position embeddings must factor the sequence and sum to the hidden size; plain ones here.
OVERRIDES["reformer"] = {"axial_pos_embds": False}
# SLANet's head runs its attention cell max_text_length + 1 times per forward (default 500).
OVERRIDES["slanet"] = {"max_text_length": 4}
# V-JEPA 2: 256 px clips of 64 frames and a 12-layer predictor are not size fields the shrinker knows.
OVERRIDES["vjepa2"] = {"crop_size": 32, "patch_size": 8, "frames_per_clip": 2, "pred_hidden_size": HIDDEN,
                       "pred_num_hidden_layers": LAYERS, "pred_num_attention_heads": HEADS}  # fmt: skip
# Windowed vision encoders: the window must fit the 4x4 patch grid of a 32 px image and, merged, the next stage.
OVERRIDES.update({t: {"window_size": 2, "depths": [1, 1], "num_heads": [2, 4]} for t in ("swin", "donut-swin")})
OVERRIDES["lw_detr_vit"] = {"num_windows": 4}
OVERRIDES["lw_detr"] = {"backbone_config.num_windows": 4}
# Probabilistic forecasters: no default horizon; a short context with few lags and one time feature.
_FORECAST = {"prediction_length": 4, "context_length": 8, "lags_sequence": [1, 2], "num_time_features": 1}
OVERRIDES.update(dict.fromkeys(("time_series_transformer", "informer"), _FORECAST))
OVERRIDES["autoformer"] = {**_FORECAST, "label_length": 2}  # the decoder's start window: within the context
# Convolutional stems: the 32 px image must survive every downsampling stage.
OVERRIDES.update({"convnext": {"patch_size": 4}, "convnextv2": {"patch_size": 4}})
_DPT_NECK = {"reassemble_hidden_size": HIDDEN}
OVERRIDES.update(dict.fromkeys(("depth_anything", "prompt_depth_anything"), _DPT_NECK))
OVERRIDES["swinv2"] = OVERRIDES["swin"]
OVERRIDES["deepseek_v2"] = {"num_experts_per_tok": 2}  # None by default (no routed experts): top-k needs a k
OVERRIDES["step3p7"] = {"text_config.sliding_window": 4}
OVERRIDES["qwen3_asr_encoder"] = {"n_window": 16}  # features are padded to a multiple of 2·n_window (2x16 here)
# Dory: without a cache (its recurrent loops share K/V through it; the tiny stack fails there untraced too)
OVERRIDES["dory"] = {"layer_types": ["sliding_attention", "mlp", "full_attention", "mlp"], "num_hidden_layers": 4,
                     "use_cache": False}
# Validators that tie one field to another the shrinker does not know about (or to a per-layer pattern).
OVERRIDES.update({
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "num_layers": LAYERS},
    "dia": {"delay_pattern": [0, 1, 2],  # one delay per codebook channel (3 after shrinking)
            "decoder_config.cross_hidden_size": HIDDEN, "decoder_config.cross_num_attention_heads": HEADS,
            "decoder_config.cross_head_dim": HEAD_DIM, "decoder_config.cross_num_key_value_heads": KV_HEADS},
    "zaya": {"num_experts_per_tok": 1},
    "molmo2": {"adapter_config.vision_feature_layer": [-1, -2]},
    "fun_asr_nano": {"adaptor_config.intermediate_size": HIDDEN // 4},
    "neomme": {"rope_parameters.full_attention.partial_rotary_factor": 0.5},  # M-RoPE: a multiple of 4 dims
    # EfficientLoFTR's 2-D rope fills hidden // 2 slots: head_dim · partial_rotary_factor == hidden, factor heads / 2
    "efficientloftr": {"out_features": [HIDDEN] * 4,
                       "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                           "partial_rotary_factor": HEADS / 2}},
})
OVERRIDES.update(dict.fromkeys(("deformable_detr", "conditional_detr", "dab-detr", "detr", "table-transformer",
                                "omdet-turbo"), _RESNET))  # fmt: skip
_QWEN4_INDEXER = {"indexer_n_heads": HEADS, "indexer_kv_heads": 1, "indexer_head_dim": HEAD_DIM, "indexer_budget": 4,
                  "indexer_compress_ratio": 2}
_MIMI = {"upsample_groups": HIDDEN, "vector_quantization_hidden_dimension": HIDDEN, "num_filters": 8,
         "codebook_size": 64, "num_quantizers": 4}
_SAM = {"prompt_encoder_config.image_embedding_size": 4, "vision_config.window_size": 2,
        "vision_config.global_attn_indexes": [1], "vision_config.output_channels": HIDDEN,
        "vision_config.num_pos_feats": HIDDEN // 2}
_SEAMLESS = {"unit_embed_dim": HIDDEN, "upsample_initial_channel": HIDDEN, "unit_hifi_gan_vocab_size": 64,
             "lang_embed_dim": 8, "spkr_embed_dim": 8, "speech_encoder_layers": LAYERS, "t2u_vocab_size": 64,
             "char_vocab_size": 64, "t2u_encoder_layers": LAYERS, "t2u_decoder_layers": LAYERS,
             "t2u_encoder_ffn_dim": FFN, "t2u_decoder_ffn_dim": FFN, "t2u_encoder_attention_heads": HEADS,
             "t2u_decoder_attention_heads": HEADS, "t2u_variance_predictor_embed_dim": HIDDEN,
             "t2u_variance_predictor_hidden_dim": HIDDEN}
# PP-DocLayout: an RT-DETR with an HGNetV2 backbone whose stage widths the hybrid encoder reads.
_PP_DOCLAYOUT = {
    "backbone_config.stem_channels": [3, 8, 16], "backbone_config.stage_in_channels": [16, 16, 32, 64],
    "backbone_config.stage_mid_channels": [8, 8, 16, 16], "backbone_config.stage_out_channels": [16, 32, 64, 128],
    "backbone_config.hidden_sizes": [16, 32, 64, 128], "backbone_config.stage_num_blocks": [1, 1, 1, 1],
    "backbone_config.stage_numb_of_layers": [2, 2, 2, 2], "encoder_in_channels": [32, 64, 128], "x4_feat_dim": 16,
    "encoder_hidden_dim": HIDDEN, "decoder_in_channels": [HIDDEN] * 3, "mask_feature_channels": [16, 16],
    "num_queries": 4, "num_denoising": 0,
}
_HIERA = {"hidden_size": 8, "blocks_per_stage": [1, 1, 2, 1], "embed_dim_per_stage": [8, 16, 32, 64],
          "num_attention_heads_per_stage": [1, 1, 2, 2], "window_size_per_stage": [4, 4, 2, 2],
          "global_attention_blocks": [3], "window_positional_embedding_background_size": [2, 2]}
_SAM2_VISION = {**{f"backbone_config.{k}": v for k, v in _HIERA.items()}, "backbone_channel_list": [64, 32, 16, 8],
                "backbone_feature_sizes": [[8, 8], [4, 4], [2, 2]], "fpn_hidden_size": HIDDEN}
_SAM2 = {**{f"vision_config.{k}": v for k, v in _SAM2_VISION.items()}, "prompt_encoder_config.patch_size": 16}
_VIDEOPRISM = {"tubelet_size": [1, 8, 8], "num_spatial_layers": LAYERS, "num_temporal_layers": LAYERS,
               "num_auxiliary_layers": 1}
_SAM3_VISION = {"vision_config.fpn_hidden_size": HIDDEN,
                "vision_config.backbone_feature_sizes": [[16, 16], [8, 8], [4, 4]],
                "vision_config.backbone_config.window_size": 2,
                "vision_config.backbone_config.global_attn_indexes": [1]}
_COMPASS_ROPE = {"full_attention": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}}
# Sizes the shrinker does not know by name (hash vocabularies, compound-scaling coefficients, codec widths...).
OVERRIDES.update({
    "blt": {"encoder_hash_byte_group_vocab": 64, "use_cache": False, "encoder_config.hidden_size_global": HIDDEN,
            "decoder_config.hidden_size_global": HIDDEN},
    # EfficientNet's top width is round_filters(1280) and ALIGN's image embedding the last stage's (320) width.
    "efficientnet": {"width_coefficient": 0.25, "depth_coefficient": 0.25, "hidden_dim": 320},
    # ALIGN's convolutions initialised at std 0.02 shrink the signal ~1e4 per block, to 0 at the pooled output.
    "align": {"vision_config.width_coefficient": 0.25, "vision_config.depth_coefficient": 0.25,
              "vision_config.hidden_dim": 320, "projection_dim": 80, "vision_config.initializer_range": 0.2},
    "longcat_flash": {"zero_expert_num": 2, "expert_ffn_hidden_size": FFN, "qk_head_dim": 2 * HEAD_DIM},
    # VQ-VAE image tokenizers: GroupNorm(32) needs a multiple of 32 channels.
    "janus": {"vq_config.base_channels": 32, "vq_config.latent_channels": 32, "vq_config.num_embeddings": 64},
    # Image-token vocabularies ship with the checkpoint's tokenizer (None by default): the text-only forward
    # needs only the image placeholder's id (outside the generated ids).
    "chameleon": {"vocabulary_map": {"<image>": VOCAB - 1}, "vq_config.base_channels": 32,
                  "vq_config.latent_channels": 32, "vq_config.num_embeddings": 64},
    "emu3": {"vocabulary_map": {"<image>": VOCAB - 1, "<|extra_200|>": VOCAB - 2}, "vq_config.base_channels": 32,
             "vq_config.codebook_size": 64},
    # Sliding-window layers (per-layer config) take qk_nope (2·HEAD_DIM there) + qk_rope as their head dim.
    "dots3_note_text": {"head_dim": 3 * HEAD_DIM},
    "dots3_note": {"text_config.head_dim": 3 * HEAD_DIM, "vision_config.per_layer_config": None,  # MoE from layer 25
                   "vision_config.adapter_in_dim": HIDDEN, "vision_config.adapter_out_dim": HIDDEN,
                   "audio_config.adapter_out_dim": HIDDEN, "audio_config.adapter_input_size": HIDDEN},
    # Image then audio codebooks laid out after the text tokens, inside the (tiny) vocabulary.
    "apertus1p5": {"image_token_id": 400, "audio_token_id": 401, "image_token_offset": 256, "audio_token_offset": 320,
                   "vision_config.codebook_size": 64, "audio_config.codebook_size": 64,
                   "vision_config.base_channels": 32, "vision_config.latent_channels": 32,
                   "vision_config.num_res_blocks": 1},
    # Rope parameters per layer type (a flat M-RoPE dict does not type-check).
    "cohere_compass_text": {"rope_parameters": _COMPASS_ROPE},
    "cohere_compass": {"text_config.rope_parameters": _COMPASS_ROPE},
    # Fields a checkpoint sets and the default config leaves None.
    "dbrx": {"attn_config.rope_theta": 10000.0, "attn_config.clip_qkv": 8.0},
    "nemotron": {"num_key_value_heads": KV_HEADS},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "dots1": {"n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2},
    "esm": {"vocab_size": 33, "pad_token_id": 1, "mask_token_id": 32},
    "qwen4_exp_text": _QWEN4_INDEXER,
    "qwen4_exp": {f"text_config.{k}": v for k, v in _QWEN4_INDEXER.items()},
    "diffusion_gemma": {"text_config.num_experts": 4, "text_config.top_k_experts": 2,
                        "text_config.moe_intermediate_size": FFN},
    "deepseek_ocr2": {"text_config.mlp_layer_types": ["dense", "sparse"], "text_config.num_experts_per_tok": 2},
    # Attributes a composite parent (or the checkpoint) sets on a sub-config that the default lacks.
    "moonshine_streaming": {"num_key_value_heads": HEADS},
    "t5gemma2_encoder": {"text_config.dropout_rate": 0.0},
    "qwen3_omni_moe_thinker": {"vision_start_token_id": VOCAB - 1},
    "qwen2_5_omni_thinker": {"vision_start_token_id": VOCAB - 1},
    # MusicGen's decoder reads (B·codebooks, L) ids: one codebook keeps the generic (B, L) ids.
    "musicgen": {"decoder.num_codebooks": 1},
    "musicgen_melody": {"decoder.num_codebooks": 1},
    # Codec upsampling convolutions grouped per channel (groups = the default hidden size).
    "mimi": _MIMI, "mimi_decoder": {"upsample_groups": HIDDEN, "num_filters": 8},
    "pocket_tts_audio_tokenizer": {"upsample_groups": HIDDEN, "num_filters": 8},
    "pocket_tts_audio_tokenizer_decoder": {"upsample_groups": HIDDEN, "num_filters": 8},
    "csm": {**{f"codec_config.{k}": v for k, v in _MIMI.items()}, "num_codebooks": 4,
            "depth_decoder_config.num_codebooks": 4, "depth_decoder_config.backbone_hidden_size": HIDDEN},
    "cvt": {"depth": [1, 2, 3]},  # stage i reads drop-path rate i of its own layers: depth[i] > i
    "vitmatte": {"convstream_hidden_sizes": [8, 16, 32], "fusion_hidden_sizes": [32, 16, 16, 8],  # lists
                 "backbone_config.patch_size": 16},  # 1/16 features fused with the detail stream's 1/8
    # Zamba ties every hybrid layer's shared transformer to the first one's: it needs a second hybrid layer.
    "zamba": {"layers_block_type": ["linear_attention", "hybrid", "hybrid"], "num_hidden_layers": 3},
    "gemma3n_text": {"num_kv_shared_layers": 0},  # 15 of 35 layers share K/V: none of the 2 kept
    "granite4_vision": {"deepstack_layer_map": [[-1, 0]], "downsample_rate": "1/2",
                        "spatial_target_layers": [1, 1, 1, 1],
                        "vision_config.hidden_size": 64},  # the Q-Former takes hidden // 64 heads
    "bros": {"hidden_size": 64},  # 1-D box embeddings: hidden // 4 // dim_bbox(8) wide, an even number
    # Layout models: the 6 box embeddings (x0, y0, x1, y1, h, w) concatenate to the hidden size (a multiple of 6).
    "lilt": {"hidden_size": 48},
    "layoutlmv3": {"hidden_size": 48, "coordinate_size": 8, "shape_size": 8},
    "levit": {"patch_size": 16},  # the stem always downsamples 16x; the attention biases follow image // patch
    "kosmos-2": {"latent_query_num": 4},  # image embeddings fill 4 of the L text positions
    "lxmert": {"visual_feat_dim": HIDDEN, "l_layers": LAYERS, "x_layers": LAYERS, "r_layers": LAYERS},
    "mobilevitv2": {"patch_size": 2, "image_size": 64},  # 32 px ends at 1x1 before the last 2x2 unfold
    # M-RoPE sections cover the rotary half of the head (partial_rotary_factor 0.5): a 16-wide head
    "glm4v_moe_text": {"head_dim": 2 * HEAD_DIM},
    "glm4v_moe": {"text_config.head_dim": 2 * HEAD_DIM},
    "paddleocr_vl": {"text_config.rope_parameters.mrope_section": [2, 1, 1]},  # [16, 24, 24] when absent
    "shieldgemma2": {"yes_token_index": 10, "no_token_index": 11},  # vocabulary ids of the answers
    "swin2sr": {"patch_size": 1, "window_size": 4},
    # SAM: the prompt encoder's dense embeddings match the 4x4 image embedding grid; windows fit it.
    "sam": _SAM, "sam_hq": {**_SAM, "mask_decoder_config.vit_dim": HIDDEN},
    "eomt": {"num_blocks": 1}, "eomt_dinov3": {"num_blocks": 1},  # the last num_blocks layers see the queries
    # OmDet-Turbo on the ResNet backbone (channels first: no layer norm after it); 16-wide decoder, 32-wide text
    "omdet-turbo": {**_RESNET, "apply_layernorm_after_vision_backbone": False, "d_model": 16,
                    "vision_features_channels": [16] * 3,
                    "encoder_in_channels": [8, 8, 8], "encoder_dim_feedforward": FFN, "decoder_num_heads": HEADS,
                    "decoder_num_layers": LAYERS, "decoder_dim_feedforward": FFN, "text_projection_in_dim": HIDDEN,
                    "text_projection_out_dim": HIDDEN, "class_embed_dim": HIDDEN,
                    # a decoder width != class_embed_dim: else task_project is never defined (transformers 5.24)
                    "decoder_hidden_dim": 16},
    # SAM 2: a 4-stage Hiera on 8x8 tokens (windows fit each stage), its FPN reading those widths and sizes.
    "sam2_hiera_det_model": _HIERA,
    "sam2_vision_model": _SAM2_VISION,
    "sam2": _SAM2, "sam2_video": _SAM2,
    # SuperGlue: SuperPoint's descriptors are the matcher's hidden size; fewer GNN layers and Sinkhorn steps
    "superglue": {"keypoint_detector_config.descriptor_decoder_dim": HIDDEN, "keypoint_encoder_sizes": [8, 16],
                  "gnn_layers_types": ["self", "cross"], "sinkhorn_iterations": 4,
                  "keypoint_detector_config.encoder_hidden_sizes": [8, 8, 16, 16],
                  "keypoint_detector_config.max_keypoints": 16},
    "nemotron_h_omni": {"image_token_id": VOCAB - 1, "video_token_id": VOCAB - 2, "audio_token_id": VOCAB - 3},
    "ernie4_5_vl_moe": {"text_config.rope_parameters.mrope_section": [1, 1, 2]},  # (h, w, t): h and w equal
    "vision-text-dual-encoder": {"vision_config.pooler_output_size": HIDDEN},  # ViT's pooler: 768 when set
    "seggpt": {"image_size": [64, 32], "intermediate_hidden_state_indices": [1], "merge_index": 0},
    "gemma3n_audio": {"conf_num_hidden_layers": LAYERS},
    "perceiver": {"num_self_attends_per_block": LAYERS, "num_self_attention_heads": HEADS,
                  "num_cross_attention_heads": HEADS},
    # X-CLIP: the multi-frame integration transformer and the video prompt generator have their own sizes
    "xclip": {"vision_config.mit_hidden_size": HIDDEN, "vision_config.mit_intermediate_size": FFN,
              "vision_config.mit_num_attention_heads": HEADS, "prompt_num_attention_heads": HEADS},
    # VideoPrism: (frames, 8, 8) tubelets of 32 px frames, 2 spatial and 2 temporal layers
    "videoprism_vision_model": _VIDEOPRISM,
    "videoprism": {f"vision_config.{k}": v for k, v in _VIDEOPRISM.items()},
    "xlstm": {"use_cache": False},  # with a cache the tiny stack fails untraced (mLSTM state shapes)
    "sam3_lite_text_text_model": {"num_hidden_layers": 3},  # first and last layers are RepMixers: one attention
    # SAM 3: the ViT's 4x4 tokens scaled x4, x2, x1 by the FPN; windows fit the grid
    "sam3_tracker": _SAM3_VISION, "sam3": _SAM3_VISION, "sam3_lite_text": _SAM3_VISION,
    "pp_doclayout_v3": _PP_DOCLAYOUT, "pp_doclayout_v4": _PP_DOCLAYOUT,
    "pp_doclayout_v2": {**_PP_DOCLAYOUT, "class_thresholds": [0.5, 0.5], "class_order": [0, 1]},  # per label
    # SeamlessM4T's text-to-unit model and vocoder sizes are prefixed (t2u_, unit_, speech_encoder_).
    "seamless_m4t": {k: v for k, v in _SEAMLESS.items() if not k.startswith(("char", "t2u_variance"))},
    "seamless_m4t_v2": _SEAMLESS,
    # Codec encoders: widths doubling from num_filters over every downsampling stage.
    "vibevoice_acoustic_tokenizer": {"num_filters": 4},
    "vibevoice_acoustic_tokenizer_encoder": {"num_filters": 4},
    "vibevoice_acoustic_tokenizer_decoder": {"num_filters": 4},
    "vibevoice": {"semantic_model_config.num_filters": 4, "audio_config.num_filters": 4},
    "vibevoice_asr": {"semantic_tokenizer_encoder_config.num_filters": 4,
                      "acoustic_tokenizer_encoder_config.num_filters": 4},
    "audio-spectrogram-transformer": {"max_length": 16, "num_mel_bins": 16, "frequency_stride": 4, "time_stride": 4},
    "blip-2": {"image_token_id": VOCAB - 1},  # image placeholders (None by default; the processor sets them)
    "instructblip": {"image_token_index": VOCAB - 1},
    "instructblipvideo": {"video_token_index": VOCAB - 1},
    # CLVP: the speech encoder reads the decoder's (8194-token) speech ids; rotary dims are at least 32 per head.
    "clvp": {"speech_config.vocab_size": 8194, "speech_config.num_attention_heads": 1,
             "text_config.num_attention_heads": 1},
    # ViTPose: the part experts' share of the MLP width (mlp_ratio·hidden); one expert needs no dataset index
    "vitpose_backbone": {"part_features": 8, "num_experts": 1},
    "vitpose": {"backbone_config.part_features": 8, "backbone_config.num_experts": 1},
    "bridgetower": {"hidden_size": 64, "text_config.hidden_size": 64, "vision_config.hidden_size": 64},  # 64 per head
})


def _set_override(kw: dict[str, Any], default: Any, key: str, value: Any) -> None:
    """`kw[key] = value`; a dotted key ("adapter_config.vision_feature_layer") sets a field inside a
    sub-config or dict field, starting from the shrunk (else the default) value of its first part."""
    head, *rest = key.split(".")
    if not rest:
        kw[key] = value
        return
    base = kw.get(head)
    if base is None:
        base = getattr(default, head, None)
        base = base.to_dict() if hasattr(base, "to_dict") else dict(base or {})
    node = base = dict(base)
    for part in rest[:-1]:
        node[part] = dict(node.get(part) or {})
        node = node[part]
    node[rest[-1]] = value
    kw[head] = base


def tiny_config(model_type: str, impl: str | dict[str, str] | None = None) -> Any:
    fam = families()[model_type]
    if fam.config_cls is None:
        raise NotBuilt(fam.reason)
    try:
        default = fam.config_cls()
    except Exception as exc:
        raise NotBuilt(f"default config fails: {type(exc).__name__}: {_short(exc)}") from None
    kw = shrink(fam.config_cls, default)
    for key, value in OVERRIDES.get(model_type, {}).items():
        _set_override(kw, default, key, value)
    try:
        cfg = fam.config_cls(**kw)
    except Exception as exc:
        raise NotBuilt(f"tiny config rejected: {type(exc).__name__}: {_short(exc)}") from None
    return cfg


def _all_configs(cfg: Any) -> list[Any]:
    out, todo = [], [cfg]
    while todo:
        c = todo.pop()
        if c is None or any(c is o for o in out):
            continue
        out.append(c)
        todo += [getattr(c, k, None) for k in (getattr(c, "sub_configs", {}) or {})]
    return out


def _for_model(model_cls: type, cfg: Any) -> Any:
    """The config the model class takes: a base class declared for one sub-config of the family's config
    (MusicGen's `MusicgenModel` is its decoder) gets that sub-config."""
    try:
        want = getattr(model_cls, "config_class", None)
    except ImportError:  # a placeholder for a missing optional dependency: its init says which
        return cfg
    if not isinstance(want, type) or isinstance(cfg, want):
        return cfg
    subs = [c for c in _all_configs(cfg) if isinstance(c, want)]
    return subs[0] if len(subs) == 1 else cfg


@dataclass
class Built:
    model_type: str
    model: torch.nn.Module
    inputs: dict[str, Any]
    impl: str | dict[str, str]
    outputs: list[torch.Tensor] | None = None  # every output tensor of the probe forward


def build(model_type: str, impl: str | dict[str, str] = "sdpa", seed: int = 0, probe: bool = True) -> Built:
    """A tiny random-weight instance of the family's base model in eval mode, with forward inputs."""
    fam = families()[model_type]
    if fam.model_cls is None:
        raise NotBuilt(fam.reason)
    cfg = _for_model(fam.model_cls, tiny_config(model_type))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                meta = fam.model_cls._from_config(cfg, attn_implementation="eager")
        except Exception as exc:
            raise NotBuilt(f"model init fails: {type(exc).__name__}: {_short(exc)}") from None
        n = sum(p.numel() for p in meta.parameters())
        if n > MAX_PARAMS:
            raise NotBuilt(f"still {n / 1e6:.1f}M parameters after shrinking")
        torch.manual_seed(seed)
        try:
            model = fam.model_cls._from_config(_for_model(fam.model_cls, tiny_config(model_type)),
                                               attn_implementation=impl)
        except (ValueError, ImportError) as exc:
            if impl == "eager" or isinstance(impl, dict):
                raise NotBuilt(f"model init fails: {type(exc).__name__}: {_short(exc)}") from None
            torch.manual_seed(seed)
            model = fam.model_cls._from_config(_for_model(fam.model_cls, tiny_config(model_type)),
                                               attn_implementation="eager")
            impl = "eager"
        except Exception as exc:
            raise NotBuilt(f"model init fails: {type(exc).__name__}: {_short(exc)}") from None
    model.eval()
    try:
        inputs = make_inputs(model)
    except NotBuilt:
        raise
    except Exception as exc:
        raise NotBuilt(f"inputs: {type(exc).__name__}: {_short(exc)}") from None
    outputs = None
    if probe:
        inputs, outputs = _probe(model, inputs)
    return Built(model_type, model, inputs, impl, outputs)


def _probe(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """One forward; then the layouts other families of the same input name take: audio features time-major
    (Parakeet-style encoders take (B, T, bins)) or with two frames stacked (W2V-BERT: (B, T, 2·bins)),
    waveforms with a channel axis (codecs: (B, 1, T)), images as a pair (keypoint matchers: (B, 2, C, H, W)) or
    one per sample (image sets, videos: (B, 1, C, H, W))."""
    tries = [inputs]
    if "input_features" in inputs:
        feats = inputs["input_features"]
        tries.append({**inputs, "input_features": feats.transpose(1, 2).contiguous()})
        stacks = {2, 4, int(getattr(model.config, "num_stacked_frames", 2) or 2)}
        for k in sorted(stacks):  # k frames stacked per step (W2V-BERT 2, Granite Speech 5 4, FunASR 7)
            t = feats.shape[-1] // k * k
            stacked = {**inputs, "input_features": feats.transpose(1, 2)[:, :t].reshape(B, -1, k * feats.shape[1])}
            if "input_features_mask" in inputs:
                stacked["input_features_mask"] = torch.ones(B, t // k, dtype=torch.long)
            tries.append(stacked)
    if "input_values" in inputs and inputs["input_values"].dim() == 2:
        tries.append({**inputs, "input_values": inputs["input_values"][:, None]})
        tries.append({**inputs, "input_values": inputs["input_values"][:, :3840]})  # whole frames (Muse Spark: 96)
    if "input_values" in inputs and hasattr(model.config, "num_mel_bins") and hasattr(model.config, "max_length"):
        # spectrogram transformers (AST): (B, frames, mel bins)
        cfg = model.config
        spec = torch.randn(B, cfg.max_length, cfg.num_mel_bins, generator=torch.Generator().manual_seed(1))
        tries.append({**inputs, "input_values": spec})
    if "bbox" in inputs:  # boxes normalised to [0, 1] (UDOP) rather than 0..1000
        tries.append({**inputs, "bbox": inputs["bbox"].float() / 1000})
    if "pixel_values" in inputs and inputs["pixel_values"].dim() == 4:
        tries.append({**inputs, "pixel_values": torch.stack([inputs["pixel_values"]] * 2, 1).flip(1, 4)})
        tries.append({**inputs, "pixel_values": inputs["pixel_values"][:, None]})  # one image (frame) per sample
        line = torch.randn(B, inputs["pixel_values"].shape[1], 48, 64, generator=torch.Generator().manual_seed(1))
        tries.append({**inputs, "pixel_values": line})  # text-line recognisers: 48 px high (PP-OCR)
    if "past_values" in inputs and inputs["past_values"].dim() == 3:  # univariate forecasters: (B, T)
        tries.append({**inputs, "past_values": inputs["past_values"][..., 0]})
    decoder = getattr(model.config, "decoder_config", None)
    if "decoder_input_ids" in inputs and isinstance(getattr(decoder, "num_channels", None), int):
        # Dia: one decoder id per audio channel (B, L, channels)
        ids = inputs["decoder_input_ids"]
        tries.append({**inputs, "decoder_input_ids": ids[..., None].expand(*ids.shape, decoder.num_channels)})
    sig = inspect.signature(model.forward).parameters
    if "input_values" in inputs and "decoder_input_values" in sig and isinstance(model.config.hidden_size, int):
        # SpeechT5 without pre-nets: encoder and decoder read hidden states (B, L, hidden)
        gen = torch.Generator().manual_seed(1)
        hidden = model.config.hidden_size
        tries.append({**inputs, "input_values": torch.randn(B, L, hidden, generator=gen),
                      "decoder_input_values": torch.randn(B, DEC_L, hidden, generator=gen)})  # fmt: skip
    if "grid_thw" in inputs and inputs.get("pixel_values") is not None and inputs["pixel_values"].dim() == 2:
        # Kimi-K2.5's tower: patches as images (N, C, p, p)
        patch = getattr(model.config, "patch_size", None)
        if isinstance(patch, int) and inputs["pixel_values"].shape[1] % (patch * patch) == 0:
            flat = inputs["pixel_values"]
            tries.append({**inputs, "pixel_values": flat.reshape(len(flat), -1, patch, patch)})
    if "target_sizes" in inputs:  # MiniCPM vision towers: position ids of one image per call
        tries.append({**inputs, "pixel_values": inputs["pixel_values"][:1], "target_sizes": inputs["target_sizes"][:1]})
    first: Exception | None = None
    for kw in tries:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = all_tensors(run(model, kw))
            return kw, out
        except Exception as exc:
            first = first or exc
    raise NotBuilt(f"forward fails: {type(first).__name__}: {_short(first)}")


def _token_ids(cfg: Any) -> set[int]:
    out: set[int] = set()
    for c in _all_configs(cfg):
        for k, v in c.to_dict().items() if hasattr(c, "to_dict") else ():
            if (k.endswith("_token_id") or k.endswith("_token_index") or k.endswith("_token_ids")) and v is not None:
                out.update(v if isinstance(v, list) else [v] if isinstance(v, int) else [])
    return out


def _token_names(cfg: Any) -> set[str]:
    return {k for c in _all_configs(cfg) if hasattr(c, "to_dict") for k, v in c.to_dict().items() if v is not None}


def _first(cfgs: list[Any], *names: str, default: Any = None) -> Any:
    for c in cfgs:
        for n in names:
            v = getattr(c, n, None)
            if v is not None:
                return v
    return default


# Forward inputs a family needs beside its `main_input_name` that the signature does not mark required (the
# model checks them at run time: "You have to specify either input_ids or ...").
EXTRA_INPUTS: dict[str, set[str]] = {
    "kosmos-2": {"input_ids", "image_embeds_position_mask"}, "lxmert": {"visual_feats"}, "sam3": {"input_ids"},
    "sam3_lite_text": {"input_ids"}, "sam3_lite_text_text_model": {"input_ids"}, "vilt": {"pixel_values"},
    "voxtral_realtime": {"input_features"}, "speech-encoder-decoder": {"input_values"},
    "audioflamingo3_encoder": {"input_features_mask"}, "clvp": {"input_features"},
    "instructblip": {"input_ids", "qformer_input_ids"}, "instructblipvideo": {"input_ids", "qformer_input_ids"},
    "idefics": {"pixel_values", "image_attention_mask"}, "siglip2": {"spatial_shapes"}, "xmod": {"lang_ids"},
}  # fmt: skip


def make_inputs(model: torch.nn.Module) -> dict[str, Any]:
    """Forward inputs from the signature: what `main_input_name` names, plus masks and decoder ids."""
    cfg = model.config
    cfgs = _all_configs(cfg)
    sig = inspect.signature(model.forward).parameters
    g = torch.Generator().manual_seed(1)
    main = getattr(model, "main_input_name", "input_ids")
    inputs: dict[str, Any] = {}
    required = [n for n, p in sig.items() if p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self"]  # fmt: skip

    def ids(length: int) -> torch.Tensor:
        vocab = _first([cfg, *cfgs], "vocab_size", default=VOCAB)
        vocab = min(int(vocab), 200)
        bad = _token_ids(cfg)
        pool = torch.tensor([i for i in range(3, vocab) if i not in bad])
        return pool[torch.randint(0, len(pool), (B, length), generator=g)]

    mains = main if isinstance(main, (list, tuple)) else [main]  # OneFormer: pixel values and task inputs
    want = {*mains, *required, *EXTRA_INPUTS.get(getattr(cfg, "model_type", ""), ())}
    want.discard("inputs")  # a generic encoder-decoder's alias of its encoder's input (named in EXTRA_INPUTS)
    if "grid_thw" in want and "input_ids" not in sig:
        want.discard("input_ids")  # a vision tower whose `main_input_name` is inherited
    if "input_ids" in want:
        inputs["input_ids"] = ids(L)
        if "attention_mask" in sig:
            mask = torch.ones(B, L, dtype=torch.long)
            mask[1, L - 3:] = 0  # right padding: keys masked in row 1
            inputs["attention_mask"] = mask
    dual = not any(k in _token_names(cfg) for k in ("image_token_id", "image_token_index", "image_patch_id"))
    if "pixel_values" in sig and dual and main == "input_ids" and getattr(cfg, "vision_config", None) is not None:
        want.add("pixel_values")  # dual encoders (CLIP-like) need both modalities
    if "pixel_values" in want and "grid_thw" not in want:
        vc = [getattr(cfg, "vision_config", None) or cfg, *cfgs]
        size = _first(vc, "image_size", default=32)
        size = size[0] if isinstance(size, (list, tuple)) else size
        if isinstance(size, dict):
            size = size.get("height", 32)
        ch = _first(vc, "num_channels", default=3)
        frames = _first(vc, "num_frames", default=None)
        shape = (B, frames, ch, size, size) if isinstance(frames, int) else (B, ch, size, size)
        inputs["pixel_values"] = torch.randn(*shape, generator=g)
    if "grid_thw" in want:
        # Qwen2-VL-style vision towers: flattened patches (Σ t·h·w, C·temporal_patch·patch²) and each image's
        # (t, h, w) patch grid; h and w a multiple of the spatial merge.
        vc = [getattr(cfg, "vision_config", None) or cfg, *cfgs]
        merge = int(_first(vc, "spatial_merge_size", "merge_size", default=1) or 1)
        patch = _first(vc, "patch_size", default=8)
        patch = patch[0] if isinstance(patch, (list, tuple)) else int(patch)
        dim = (int(_first(vc, "in_channels", "num_channels", default=3))
               * int(_first(vc, "temporal_patch_size", "patch_temporal", default=1) or 1) * patch * patch)  # fmt: skip
        side = 2 * merge
        inputs["grid_thw"] = torch.tensor([[1, side, side]] * B)
        flat = "hidden_states" if "hidden_states" in want else "pixel_values"
        inputs[flat] = torch.randn(B * side * side, dim, generator=g)
        if "merge_sizes" in want:  # VideoLLaMA 3: each image's spatial merge
            inputs["merge_sizes"] = torch.tensor([merge] * B)
    if "input_features" in want:
        bins = _first(cfgs, "num_mel_bins", "feature_size", "input_feat_per_channel", default=80)
        n_pos = _first(cfgs, "max_source_positions", default=None)
        t = 2 * n_pos if isinstance(n_pos, int) and n_pos <= 3000 else 64
        inputs["input_features"] = torch.randn(B, bins, t, generator=g)
    if "input_values" in want:
        inputs["input_values"] = torch.randn(B, 4000, generator=g)
    if "protein_input_ids" in sig:
        # Evolla: without a protein its aligner cross-attention is skipped (no modality to attend to).
        pc = getattr(cfg, "protein_encoder_config", None)
        vocab = min(int(getattr(pc, "vocab_size", 30)), 30)
        inputs["protein_input_ids"] = torch.randint(4, vocab, (B, 6), generator=g)
        inputs["protein_attention_mask"] = torch.ones(B, 6, dtype=torch.long)
    if "past_values_padding" in want and "freq" in want:
        # TimesFM: a patched univariate series with its padding indicator (1 = padded) and a frequency id.
        patch = int(getattr(cfg, "patch_length", 4))
        inputs["past_values"] = torch.randn(B, 2 * patch, generator=g)
        pad = torch.zeros(B, 2 * patch)
        pad[1, :patch] = 1.0  # the first patch of row 1 is padding: masked keys
        inputs["past_values_padding"] = pad
        inputs["freq"] = torch.zeros(B, 1, dtype=torch.long)
    if "bbox" in sig and "input_ids" in inputs:  # layout models: one box (x0, y0, x1, y1) in 0..1000 per token
        xy = torch.randint(0, 500, (B, L, 2), generator=g)
        inputs["bbox"] = torch.cat([xy, xy + torch.randint(1, 500, (B, L, 2), generator=g)], -1)
    if "past_time_features" in want:
        # Probabilistic forecasters: a context of context_length + max(lags) steps, then the horizon.
        ctx = int(cfg.context_length) + max(cfg.lags_sequence)
        n_tf, horizon = int(cfg.num_time_features), int(cfg.prediction_length)
        inputs["past_values"] = torch.randn(B, ctx, generator=g)
        inputs["past_time_features"] = torch.randn(B, ctx, n_tf, generator=g)
        inputs["past_observed_mask"] = torch.ones(B, ctx)
        inputs["future_values"] = torch.randn(B, horizon, generator=g)
        inputs["future_time_features"] = torch.randn(B, horizon, n_tf, generator=g)
    if "qformer_input_ids" in want:  # InstructBLIP: the Q-Former reads the instruction too
        inputs["qformer_input_ids"] = ids(L)
        if "qformer_attention_mask" in sig:
            inputs["qformer_attention_mask"] = torch.ones(B, L, dtype=torch.long)
    if "input_features_mask" in want and "input_features" in inputs:  # audio encoders: every frame valid
        inputs["input_features_mask"] = torch.ones(B, inputs["input_features"].shape[-1], dtype=torch.long)
    if "pixel_values_videos" in want:  # video encoders: (B, frames, C, H, W), frames a multiple of the tubelet
        vc = [getattr(cfg, "vision_config", None) or cfg, *cfgs]
        size = _first(vc, "crop_size", "image_size", default=32)
        size = size[0] if isinstance(size, (list, tuple)) else size
        tubelet = _first(vc, "tubelet_size", default=2) or 2
        frames = max(2, int(tubelet[0] if isinstance(tubelet, (list, tuple)) else tubelet))  # (t, h, w) tubelets
        inputs["pixel_values_videos"] = torch.randn(B, frames, _first(vc, "num_channels", default=3), size, size,
                                                    generator=g)  # fmt: skip
    if "past_values" in want and "past_time_features" not in want and "past_values" not in inputs:
        # PatchTST/PatchTSMixer: (B, context length, channels)
        length = int(_first(cfgs, "context_length", default=32))
        inputs["past_values"] = torch.randn(B, length, int(_first(cfgs, "num_input_channels", default=1)), generator=g)
    if "spatial_shapes" in want:
        # NaFlex (SigLIP 2): flattened patches (B, N, C·p²) of a 4x4 grid, the valid-patch mask (row 1: the last
        # row of patches padded) and each image's grid
        vc = [getattr(cfg, "vision_config", None) or cfg, *cfgs]
        patch = int(_first(vc, "patch_size", default=8))
        dim = int(_first(vc, "num_channels", default=3)) * patch * patch
        inputs["pixel_values"] = torch.randn(B, 16, dim, generator=g)
        inputs["pixel_attention_mask"] = torch.ones(B, 16, dtype=torch.long)
        inputs["pixel_attention_mask"][1, 12:] = 0
        inputs["spatial_shapes"] = torch.tensor([[4, 4], [3, 4]])
    if "pixel_position_ids" in want:
        # Gemma 4 vision: (B, patches, C·p²) patches of a square grid of pooling windows, (x, y) per patch
        vc = [getattr(cfg, "vision_config", None) or cfg, *cfgs]
        patch = int(_first(vc, "patch_size", default=8))
        side = 2 * int(_first(vc, "pooling_kernel_size", default=1))
        yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        inputs["pixel_values"] = torch.rand(B, side * side, 3 * patch * patch, generator=g)
        inputs["pixel_position_ids"] = torch.stack([xx.flatten(), yy.flatten()], -1).expand(B, -1, -1).clone()
    if "target_sizes" in sig and "input_ids" not in inputs and inputs.get("pixel_values", torch.empty(0)).dim() == 4:
        # MiniCPM vision towers: each image's patch grid (h, w) (the composites take it with token type ids)
        patch = int(_first([cfg, *cfgs], "patch_size", default=8))
        h, w = inputs["pixel_values"].shape[-2:]
        inputs["target_sizes"] = torch.tensor([[h // patch, w // patch]] * B, dtype=torch.int32)
    if "image_attention_mask" in want and "pixel_values" in inputs:  # IDEFICS: image sets, each token sees image 0
        inputs["pixel_values"] = inputs["pixel_values"][:, None]
        inputs["image_attention_mask"] = torch.ones(B, L, 1, dtype=torch.long)
    if "image_embeds_position_mask" in want and "pixel_values" in inputs:  # Kosmos-2: where the image embeddings go
        n = int(_first(cfgs, "latent_query_num", default=4))
        inputs["image_embeds_position_mask"] = torch.zeros(B, L, dtype=torch.long)
        inputs["image_embeds_position_mask"][:, 1 : 1 + n] = 1
    if "visual_feats" in want:  # LXMERT: region features and their boxes
        n_boxes = 4
        inputs["visual_feats"] = torch.randn(B, n_boxes, int(cfg.visual_feat_dim), generator=g)
        inputs["visual_pos"] = torch.rand(B, n_boxes, int(cfg.visual_pos_dim), generator=g)
    if "returns_to_go" in sig and "states" in sig:
        # Decision Transformer: an episode of L steps, the last 3 steps of row 1 padded
        inputs["states"] = torch.randn(B, L, int(cfg.state_dim), generator=g)
        inputs["actions"] = torch.randn(B, L, int(cfg.act_dim), generator=g)
        inputs["rewards"] = torch.randn(B, L, 1, generator=g)
        inputs["returns_to_go"] = torch.randn(B, L, 1, generator=g)
        inputs["timesteps"] = torch.arange(L).expand(B, L).clone()
        inputs["attention_mask"] = torch.ones(B, L, dtype=torch.long)
        inputs["attention_mask"][1, L - 3 :] = 0
    if "classes_structure" in want:  # OmDet-Turbo: 2 class prompts per image and a task prompt
        inputs["classes_input_ids"] = torch.cat([ids(L), ids(L)])
        inputs["classes_attention_mask"] = torch.ones(2 * B, L, dtype=torch.long)
        inputs["classes_structure"] = torch.tensor([2] * B)
        inputs["tasks_input_ids"] = ids(L)
        inputs["tasks_attention_mask"] = torch.ones(B, L, dtype=torch.long)
    if "query_embeds" in want and "input_ids" not in sig:
        # a stand-alone Q-Former: its learned queries (B, queries, hidden) attending to image features
        inputs.pop("input_ids", None)
        inputs.pop("attention_mask", None)
        inputs["query_embeds"] = torch.randn(B, 4, int(cfg.hidden_size), generator=g)
        if "encoder_hidden_states" in sig:
            inputs["encoder_hidden_states"] = torch.randn(B, 6, int(cfg.encoder_hidden_size), generator=g)
    if "prompt_masks" in want and isinstance(getattr(cfg, "image_size", None), (list, tuple)):
        # SegGPT: the image under its in-context prompt image (and the prompt's mask), stacked to image_size
        shape = (B, 3, cfg.image_size[0] // 2, cfg.image_size[1])
        for name in ("pixel_values", "prompt_pixel_values", "prompt_masks"):
            inputs[name] = torch.randn(*shape, generator=g)
    if "audio_mel_mask" in want:  # Gemma 3n audio: (B, frames, mel bins), the mask marks padded frames (none)
        inputs["audio_mel"] = torch.randn(B, 64, int(cfg.input_feat_size), generator=g)
        inputs["audio_mel_mask"] = torch.zeros(B, 64, dtype=torch.bool)
    if "flattened_patches" in sig:
        # Pix2Struct: (B, patches, 2 + C·p²) with each patch's (row, col) first; the last 4 patches of row 1 padded
        vc = getattr(cfg, "vision_config", None) or cfg
        rows, cols = torch.meshgrid(torch.arange(1, 5), torch.arange(1, 5), indexing="ij")
        pos = torch.stack([rows.flatten(), cols.flatten()], -1).float().expand(B, -1, -1)
        patches = torch.randn(B, 16, int(vc.patch_embed_hidden_size), generator=g)
        inputs["flattened_patches"] = torch.cat([pos, patches], -1)
        if "input_ids" not in inputs:  # Pix2Struct: the mask is the patches' (Kosmos-2.5's is the text's)
            inputs["attention_mask"] = torch.ones(B, 16, dtype=torch.long)
            inputs["attention_mask"][1, 12:] = 0
    if "inputs" in required and hasattr(cfg, "d_latents"):  # Perceiver without a preprocessor: (B, L, d_model)
        inputs["inputs"] = torch.randn(B, L, int(cfg.d_model), generator=g)
    if "inputs_embeds" in required and "input_ids" not in sig:  # encoders of another model's states (B, L, hidden)
        width = int(_first([cfg, *cfgs], "hidden_size", default=HIDDEN))
        inputs["inputs_embeds"] = torch.randn(B, L, width, generator=g)
        if "attention_mask" in sig:
            inputs["attention_mask"] = torch.ones(B, L, dtype=torch.long)
            inputs["attention_mask"][1, L - 3 :] = 0
    if "task_inputs" in want:  # OneFormer: the task prompt ("the task is semantic") as token ids
        inputs["task_inputs"] = ids(int(getattr(cfg, "text_encoder_context_length", L)))
    if "lang_ids" in want:  # X-MOD: the language adapter of each sample
        inputs["lang_ids"] = torch.zeros(B, dtype=torch.long)
    if "latents" in want:  # codec decoders: continuous latents (B, hidden, frames)
        inputs["latents"] = torch.randn(B, int(_first(cfgs, "hidden_size", default=HIDDEN)), L, generator=g)
    if "decoder_input_ids" in sig and getattr(cfg, "is_encoder_decoder", False) and "inputs_embeds" not in want:
        inputs["decoder_input_ids"] = ids(DEC_L)
    missing = [n for n in required if n not in inputs]
    if missing:
        raise NotBuilt(f"forward needs {missing} (no generic input)")
    return inputs


def run(model: torch.nn.Module, inputs: dict[str, Any], **extra: Any) -> Any:
    torch.manual_seed(0)  # some forwards draw noise (ViT-MAE's random masking): same draw every run
    with torch.no_grad():
        return model(**inputs, **extra)


def first_tensor(out: Any) -> torch.Tensor:
    """The first tensor of a model output (ModelOutput, tuple or tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    values = out.to_tuple() if hasattr(out, "to_tuple") else out
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
        if isinstance(v, (tuple, list)) or hasattr(v, "to_tuple"):
            try:
                return first_tensor(v)
            except ValueError:
                continue
    raise ValueError("no tensor in the model output")


def all_tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model output, depth first (for bit-identity checks)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in all_tensors(v)]
    return []


def outputs_equal(a: Any, b: Any) -> bool:
    """Two model outputs hold the same tensors, nested ones included (per-layer attentions), bit for bit
    (and at least one). Deep: a traced run that returned one attentions entry more than untraced failed no
    top-level comparison."""
    ta, tb = all_tensors(a), all_tensors(b)
    return len(ta) == len(tb) > 0 and all(torch.equal(x, y) for x, y in zip(ta, tb))


__all__ = ["Built", "Family", "NotBuilt", "build", "families", "make_inputs", "outputs_equal", "run", "tiny_config"]
