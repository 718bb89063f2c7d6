"""Train the joint-attention toy-world model on the CPU: `python -m attntrace.toyworld.train_joint --out DIR`.

The second shipped toy-world model: a `StableDiffusion3Pipeline` whose `SD3Transformer2DModel` attends
jointly over image and text tokens (image first, then text) in every block, so heat maps on it read the
image-query x text-key part of joint attention, the layout the UNet model never exercises. It reuses the
first model's world, tokenizer, held-out split and VAE (`attntrace/data/toyworld/sd`), so only the text
encoders and the transformer are trained:

1. text        two small `CLIPTextModelWithProjection`s (SD3 concatenates their per-token features and
               their pooled projections) with one transformer layer each: SD3 reads the penultimate
               hidden states, which are then the token embeddings alone (each word's feature holds only
               that word and its position, as in the UNet model), while the pooled projections see the
               whole caption;
2. latents     the scenes are encoded once with the shipped VAE; the latents' mean and scale go to its
               config (`shift_factor`, `scaling_factor`), as SD3's pipeline expects;
3. flow        rectified flow (SD3's objective: x_t = (1 - s) x0 + s noise, predict noise - x0, s from a
               logit-normal), with the same attention losses as the UNet model on the mean over blocks
               and heads of each block's image-query x text-key probabilities; EMA weights are shipped;
4. evaluation  as the UNet model's, with SD3's flow-matching Euler sampler.

There is no T5: the pipeline is saved with `text_encoder_3=None`, and SD3 then appends
`max_sequence_length` zero text tokens. The model is trained without them, so call it with
`max_sequence_length=0`, as `attntrace.toyworld.call_kwargs(pipe)` says.
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .model import MODEL_DIR, call_kwargs
from .train import (
    MAX_TOKENS,
    RunLog,
    apply_settings,
    attention_losses,
    attention_targets,
    encode_pool,
    held_out,
    held_out_scenes,
    lr_at,
    prompt_following,
    sample_batch,
    seed_run,
    single_object_following,
    step_and_average,
    write_record,
    write_tokenizer,
)
from .world import Scene, sample_scene


@dataclass
class JointSettings:
    """Everything that decides the result (recorded in training.json)."""

    seed: int = 0
    threads: int = 1
    pool: int = 12000
    steps: int = 9000  # 22 minutes on one thread; 4000 gave pointing 0.75, mIoU 0.52 (9000: 0.95, 0.62)
    batch: int = 32
    lr: float = 5e-4
    warmup: int = 200
    ema: float = 0.998
    caption_dropout: float = 0.1
    attention_loss: float = 0.2  # share of each object word's map outside its object (as the UNet model)
    coverage_loss: float = 0.1  # KL from the object's normalised mask to the word's normalised map
    uncond_attention_loss: float = 0.5  # dropped captions' maps pushed to flat
    width: int = 64  # transformer inner width (heads x head width)
    heads: int = 2
    layers: int = 4
    patch: int = 2  # 16x16 latents -> 8x8 image tokens
    text_width: int = 64  # first CLIP text encoder; the second is half as wide
    eval_prompts: int = 100
    eval_steps: int = 20
    guidance: float = 5.0


def build_models(tok: Any, s: JointSettings) -> tuple[Any, Any, Any]:
    """Fresh (text encoder, text encoder 2, transformer) from configs; weights from the torch seed."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    def clip(width: int) -> Any:
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(tok),
                hidden_size=width,
                intermediate_size=2 * width,
                num_hidden_layers=1,  # SD3 reads hidden_states[-2]: the embeddings, one word each
                num_attention_heads=4,
                max_position_embeddings=MAX_TOKENS,
                projection_dim=width,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        )

    te1, te2 = clip(s.text_width), clip(s.text_width // 2)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=s.patch,
        in_channels=8,
        num_layers=s.layers,
        attention_head_dim=s.width // s.heads,
        num_attention_heads=s.heads,
        joint_attention_dim=s.text_width + s.text_width // 2,
        caption_projection_dim=s.width,
        pooled_projection_dim=s.text_width + s.text_width // 2,
        out_channels=8,
        pos_embed_max_size=16 // s.patch,
    )
    return te1, te2, transformer


def scheduler_config() -> dict[str, Any]:
    """Flow-matching Euler (SD3's sampler), no timestep shift at this size."""
    return {"num_train_timesteps": 1000, "shift": 1.0}


class KeepJointProbs:
    """Training-time joint-attention processor that also keeps the image-query x text-key probabilities
    (head mean, with gradients). Only used while training; the shipped model has diffusers' processors."""

    def __init__(self, store: list[torch.Tensor]) -> None:
        self.store = store

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None, **_: Any) -> Any:
        b, n = hidden_states.shape[:2]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q = heads(attn.to_q(hidden_states))
        k = heads(attn.to_k(hidden_states))
        v = heads(attn.to_v(hidden_states))
        q = torch.cat([q, heads(attn.add_q_proj(encoder_hidden_states))], 2)
        k = torch.cat([k, heads(attn.add_k_proj(encoder_hidden_states))], 2)
        v = torch.cat([v, heads(attn.add_v_proj(encoder_hidden_states))], 2)
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
        self.store.append(probs[:, :, :n, n:].mean(1))  # (batch, image tokens, text tokens)
        out = (probs @ v).transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1])
        img, txt = out[:, :n], out[:, n:]
        img = attn.to_out[1](attn.to_out[0](img))
        if attn.context_pre_only:
            return img, txt
        return img, attn.to_add_out(txt)


def _encode_text(te1: Any, te2: Any, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What SD3's `encode_prompt` builds without T5: per-token features and pooled projections."""
    o1 = te1(ids, output_hidden_states=True)
    o2 = te2(ids, output_hidden_states=True)
    tokens = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], -1)
    return tokens, torch.cat([o1.text_embeds, o2.text_embeds], -1)


def train_flow(
    models: tuple[Any, Any, Any],
    tok: Any,
    latents: torch.Tensor,
    scenes: list[Scene],
    s: JointSettings,
    gen: torch.Generator,
    log: Any,
) -> tuple[Any, Any, Any]:
    """Joint transformer + text-encoder training; returns the EMA copies (what ships)."""
    te1, te2, transformer = models
    obj_pos, masks16 = attention_targets(scenes)
    side = 16 // s.patch
    obj_masks = masks16.view(-1, 3, side, s.patch, side, s.patch).mean((3, 5)).flatten(2)  # token grid
    ids_all = tok([sc.caption for sc in scenes], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt")
    ids_all = ids_all.input_ids
    empty = tok([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
    params = [p for m in models for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.01)
    emas = tuple(copy.deepcopy(m).eval() for m in models)
    ema_params = [p for m in emas for p in m.parameters()]
    store: list[torch.Tensor] = []
    transformer.set_attn_processor(KeepJointProbs(store))  # the EMA copy keeps diffusers' processors
    for m in models:
        m.train()
    t0 = time.perf_counter()
    for step in range(s.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s, s.steps)
        idx, x0, ids, drop = sample_batch(latents, ids_all, empty, s, gen)
        sigma = torch.sigmoid(torch.randn(s.batch, generator=gen)).view(-1, 1, 1, 1)  # logit-normal, as SD3
        noise = torch.randn(x0.shape, generator=gen)
        xt = (1 - sigma) * x0 + sigma * noise
        tokens, pooled = _encode_text(te1, te2, ids)
        store.clear()
        pred = transformer(
            hidden_states=xt, encoder_hidden_states=tokens, pooled_projections=pooled, timestep=sigma.flatten() * 1000
        ).sample
        loss = F.mse_loss(pred, noise - x0)
        # the UNet model's attention losses, on the mean over blocks of the image x text probabilities
        amap = torch.stack(store).mean(0)  # (batch, image tokens, text tokens)
        attn_loss, terms = attention_losses(amap, obj_pos[idx], obj_masks[idx], drop, s)
        for term in terms:
            loss = loss + term
        step_and_average(opt, loss, params, ema_params, step, s.ema)
        if step % 100 == 0 or step == s.steps - 1:
            rate = (step + 1) / (time.perf_counter() - t0)
            losses = f"loss {float(loss.detach()):.4f} attn {float(attn_loss.detach()):.3f}"
            log(f"flow {step:5d}/{s.steps} {losses} ({rate:.2f} steps/s)")
    return emas


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], prog="python -m attntrace.toyworld.train_joint")
    ap.add_argument("--out", required=True, type=Path, help="folder for the from_pretrained pipeline")
    ap.add_argument("--vae-from", type=Path, default=None, help="pipeline folder whose VAE to reuse (default: shipped)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="any setting")
    args = ap.parse_args(argv)
    s = JointSettings()
    apply_settings(ap, s, args.set)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    rng, gen = seed_run(s)
    log = RunLog()
    out: Path = args.out

    tok = write_tokenizer(out / "tokenizer")
    models = build_models(tok, s)
    log("parameters: text encoders {:.2f}M + {:.2f}M, transformer {:.2f}M".format(
        *(sum(p.numel() for p in m.parameters()) / 1e6 for m in models)))  # fmt: skip
    vae = AutoencoderKL.from_pretrained(str((args.vae_from or MODEL_DIR) / "vae")).eval()
    pool: list[Scene] = []
    while len(pool) < s.pool:
        sc = sample_scene(rng)
        if not held_out(sc.caption):
            pool.append(sc)
    raw = encode_pool(vae, pool)
    shift, scaling = float(raw.mean()), float(1.0 / raw.std())
    vae.register_to_config(scaling_factor=scaling, shift_factor=shift)
    log(f"encoded {len(pool)} scenes; latent shift {shift:.4f}, scaling {scaling:.4f}")
    te1, te2, transformer = train_flow(models, tok, (raw - shift) * scaling, pool, s, gen, log)
    t_train = log.elapsed()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config()),
        vae=vae,
        text_encoder=te1,
        tokenizer=tok,
        text_encoder_2=te2,
        tokenizer_2=tok,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(out, safe_serialization=True)
    log(f"saved to {out}")
    follow = prompt_following(pipe, held_out_scenes(s.eval_prompts), s.seed, s.eval_steps, s.guidance)
    single = single_object_following(pipe, s.seed, s.eval_steps, s.guidance)
    log(f"prompt following on {follow['n']} held-out captions: {follow['rate']:.3f}; single objects {single:.3f}")
    record = {
        "command": "python -m attntrace.toyworld.train_joint " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": asdict(s),
        "call": call_kwargs(pipe),
        "seconds": {
            "training": round(t_train, 1),
            "total_with_eval": round(log.elapsed(), 1),
            "cpu_user": round(resource.getrusage(resource.RUSAGE_SELF).ru_utime, 1),
        },
        "latent_shift_factor": shift,
        "latent_scaling_factor": scaling,
        "prompt_following": follow,
        "single_object_following": single,
        "eval": {"steps": s.eval_steps, "guidance": s.guidance, "seed": s.seed, "scheduler": "flow-matching Euler"},
    }
    write_record(out, record, {"text_encoder": te1, "text_encoder_2": te2, "transformer": transformer}, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
