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
OVERRIDES.update({"convnext": {"patch_size": 4}, "convnextv2": {"patch_size": 4}, "mobilevitv2": {"patch_size": 2}})
_DPT_NECK = {"reassemble_hidden_size": HIDDEN}
OVERRIDES.update(dict.fromkeys(("depth_anything", "prompt_depth_anything"), _DPT_NECK))
OVERRIDES["swinv2"] = OVERRIDES["swin"]
OVERRIDES["deepseek_v2"] = {"num_experts_per_tok": 2}  # None by default (no routed experts): top-k needs a k
OVERRIDES["step3p7"] = {"text_config.sliding_window": 4}
OVERRIDES["qwen3_asr_encoder"] = {"n_window": 16}  # features are padded to a multiple of 2·n_window (2x16 here)
OVERRIDES["dory"] = {"layer_types": ["sliding_attention", "mlp", "full_attention", "mlp"], "num_hidden_layers": 4}
# Validators that tie one field to another the shrinker does not know about (or to a per-layer pattern).
OVERRIDES.update({
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "dia": {"delay_pattern": [0, 1, 2]},  # one delay per codebook channel (3 after shrinking)
    "zaya": {"num_experts_per_tok": 1},
    "molmo2": {"adapter_config.vision_feature_layer": [-1, -2]},
    "fun_asr_nano": {"adaptor_config.intermediate_size": HIDDEN // 4},
    "neomme": {"rope_parameters.full_attention.partial_rotary_factor": 0.5},  # M-RoPE: a multiple of 4 dims
    "efficientloftr": {"out_features": [HIDDEN] * 4},
})
OVERRIDES.update(dict.fromkeys(("deformable_detr", "conditional_detr", "dab-detr", "detr", "table-transformer",
                                "omdet-turbo"), _RESNET))  # fmt: skip


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
    cfg = tiny_config(model_type)
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
            model = fam.model_cls._from_config(tiny_config(model_type), attn_implementation=impl)
        except (ValueError, ImportError) as exc:
            if impl == "eager" or isinstance(impl, dict):
                raise NotBuilt(f"model init fails: {type(exc).__name__}: {_short(exc)}") from None
            torch.manual_seed(seed)
            model = fam.model_cls._from_config(tiny_config(model_type), attn_implementation="eager")
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
    waveforms with a channel axis (codecs: (B, 1, T)), images as a pair (keypoint matchers: (B, 2, C, H, W))."""
    tries = [inputs]
    if "input_features" in inputs:
        feats = inputs["input_features"]
        tries.append({**inputs, "input_features": feats.transpose(1, 2).contiguous()})
        tries.append({**inputs, "input_features": feats.transpose(1, 2).reshape(B, -1, 2 * feats.shape[1])})
    if "input_values" in inputs and inputs["input_values"].dim() == 2:
        tries.append({**inputs, "input_values": inputs["input_values"][:, None]})
    if "bbox" in inputs:  # boxes normalised to [0, 1] (UDOP) rather than 0..1000
        tries.append({**inputs, "bbox": inputs["bbox"].float() / 1000})
    if "pixel_values" in inputs and inputs["pixel_values"].dim() == 4:
        tries.append({**inputs, "pixel_values": torch.stack([inputs["pixel_values"]] * 2, 1).flip(1, 4)})
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
    "kosmos-2": {"input_ids"}, "sam3": {"input_ids"}, "sam3_lite_text": {"input_ids"}, "vilt": {"pixel_values"},
    "voxtral_realtime": {"input_features"}, "speech-encoder-decoder": {"input_values"},
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

    want = {main, *required, *EXTRA_INPUTS.get(getattr(cfg, "model_type", ""), ())}
    want.discard("inputs")  # a generic encoder-decoder's alias of its encoder's input (named in EXTRA_INPUTS)
    if "grid_thw" in want and "input_ids" not in sig:
        want.discard("input_ids")  # a vision tower whose `main_input_name` is inherited
    if "input_ids" in want:
        inputs["input_ids"] = ids(L)
        if "attention_mask" in sig:
            mask = torch.ones(B, L, dtype=torch.long)
            mask[1, L - 3:] = 0  # right padding: keys masked in row 1
            inputs["attention_mask"] = mask
    dual = not any(k in _token_names(cfg) for k in ("image_token_id", "image_token_index"))
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
               * int(_first(vc, "temporal_patch_size", default=1) or 1) * patch * patch)  # fmt: skip
        side = 2 * merge
        inputs["grid_thw"] = torch.tensor([[1, side, side]] * B)
        flat = "hidden_states" if "hidden_states" in want else "pixel_values"
        inputs[flat] = torch.randn(B * side * side, dim, generator=g)
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
        frames = max(2, int(_first(vc, "tubelet_size", default=2) or 2))
        inputs["pixel_values_videos"] = torch.randn(B, frames, _first(vc, "num_channels", default=3), size, size,
                                                    generator=g)  # fmt: skip
    if "past_values" in want and "past_time_features" not in want and "past_values" not in inputs:
        # PatchTST/PatchTSMixer: (B, context length, channels)
        length = int(_first(cfgs, "context_length", default=32))
        inputs["past_values"] = torch.randn(B, length, int(_first(cfgs, "num_input_channels", default=1)), generator=g)
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
