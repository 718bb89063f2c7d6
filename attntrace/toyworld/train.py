"""Train the toy-world text-to-image model on the CPU: `python -m attntrace.toyworld.train --out DIR`.

This is also the worked example of how to prepare a model with real, checkable semantics for
attntrace's tests. Everything is a stock diffusers/transformers part, so the result loads with
`StableDiffusionPipeline.from_pretrained(DIR)`:

1. tokenizer   a real `CLIPTokenizer` whose vocab.json/merges.txt hold the world's words, one token each;
2. VAE         a small `AutoencoderKL` (32x32 RGB -> 8x16x16 latents), trained briefly on reconstruction;
3. latents     a fixed pool of rendered scenes is encoded once (the UNet never pays for the encoder);
4. diffusion   a small `UNet2DConditionModel` (cross-attention at 16x16, 8x8 and 4x4) and a small
               `CLIPTextModel`, trained jointly with the v-prediction loss plus attention losses
               that put each object word's map (every layer's) on its object, captions dropped 10%
               of the time so classifier-free guidance works; EMA weights are shipped;
5. evaluation  held-out captions (never rendered for training) are generated with DDIM and CFG and
               checked with the renderer's colour segmentation: does the image hold the named shapes
               in the named colours?

A fixed seed makes the run repeatable on the same software; metrics, the command and the time
taken are written to `training.json` next to the weights. The recipe is one file of about 680 lines
on purpose: it is meant to be read top to bottom as an example.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import resource
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .model import call_kwargs
from .world import COLOURS, SHAPES, VOCABULARY, Scene, parse_prompt, sample_scene

MAX_TOKENS = 16  # longest caption: 11 words + start + end


@dataclass
class Settings:
    """Everything that decides the result (recorded in training.json)."""

    seed: int = 0
    # One thread: on a shared 2-core box torch's second thread waits on the other process at every op.
    threads: int = 1
    pool: int = 12000  # rendered training scenes (encoded once)
    vae_steps: int = 2500  # 800 steps capped prompt following at 0.81 (VAE round trip scored as images)
    vae_batch: int = 16
    steps: int = 4000  # 4000 x 32 with the 3-level UNet: 45 minutes in all beside another run
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 200
    ema: float = 0.998
    caption_dropout: float = 0.1
    # Weight of the attention loss. Without it the small UNet learned to attend to every token alike
    # (maps 0.07 max vs 0.06 mean, pointing 0/11 after 1500 steps): nothing to localise, nor to edit.
    attention_loss: float = 0.2
    # Weight of the flat-map loss on dropped captions: the empty prompt names nothing, so its maps
    # should point nowhere. Without it the position embeddings the attention loss shaped made the
    # unconditional half's maps localise as well as the conditional half's (pointing 0.50 vs 0.42).
    uncond_attention_loss: float = 0.5
    # Which cross-attention maps the flat-map loss reads: "full" the mean of the 16x16 layers' maps (as the
    # attention loss), "each" every cross-attention layer's map on its own. With "full" the 16x16 decoder
    # layer's unconditional maps still pointed at the objects (0.41; the 16x16 mean is flat, not each layer).
    uncond_layers: str = "full"  # (read only with attention_layers="full")
    # Which cross-attention maps the attention and coverage losses read: "full" the mean of the 16x16 layers'
    # maps, "each" every cross-attention layer's map on its own against the mask pooled to its grid (then
    # the flat-map loss reads each layer too). With "full" and three levels only the 16x16 decoder layer
    # localised (mIoU 0.79) and the coarser layers' maps diluted the heat map (mIoU 0.22; run M).
    attention_layers: str = "each"
    # Weight of the coverage term: KL from each object's normalised mask to its words' normalised maps. The
    # attention loss alone is met by one sharp peak inside the object (v-prediction runs: mIoU 0.03).
    coverage_loss: float = 0.1
    # A level per entry, cross-attention at each. A third level (4x4) costs 1.28x the step time for 4x the
    # parameters and drew every triangle where two levels drew 11 of 16 (runs M, N).
    unet_channels: tuple[int, ...] = (32, 64, 64)
    # Attention heads per UNet attention layer. Self-attention at 16x16 (256 pixels, head width 8 with
    # 4 heads) took half of each training step on the CPU; 2 heads of width 16 halve the step time.
    unet_heads: int = 2
    vae_channels: tuple[int, int] = (16, 32)
    latent_channels: int = 8  # 4 blurred the crosses' arms and the squares' corners (measured)
    text_width: int = 64
    # No transformer layers: each word's embedding holds only that word (and its position). With a
    # contextual (causal) encoder the end-of-text/padding tokens carry the whole caption, and the
    # small UNet learned to attend uniformly to every token: maps 0.09 max vs 0.06 mean, pointing 0/10.
    text_layers: int = 0
    # What the UNet predicts: "epsilon", "v_prediction" or "sample" (written to the scheduler config).
    # v-prediction drew the named colours and places where epsilon drew colour noise (single objects
    # 0.31-0.38 vs 0.12-0.19 at equal steps; benchmarks/RESULTS_toyworld_training.md).
    prediction_type: str = "v_prediction"
    # min-SNR-γ loss weighting (Hang et al. 2023); 0 turns it off (plain MSE of what is predicted).
    # 5.0 gave mid and high noise, where shapes are decided, the least signal: triangles 1 of 16 (run H)
    # against 8 of 16 with the plain loss (run K).
    min_snr: float = 0.0
    # Decoder trained on latents with this much added noise (times the latent std): generated latents
    # are never exact, and a decoder that only saw exact encodings turns small errors into colour noise.
    decoder_noise: float = 0.5
    eval_prompts: int = 100
    eval_steps: int = 20
    guidance: float = 5.0


# -- the held-out split ---------------------------------------------------------------------------
def held_out(caption: str) -> bool:
    """Multi-object captions kept out of training (about 1 in 8), for evaluation and the tests."""
    return caption.count(" a ") > 0 and zlib.crc32(caption.encode()) % 8 == 0


def held_out_scenes(n: int, seed: int = 1234) -> list[Scene]:
    """`n` scenes whose captions were never rendered for training (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    out: list[Scene] = []
    while len(out) < n:
        s = sample_scene(rng, n_objects=int(rng.choice([2, 3], p=[0.6, 0.4])))
        if held_out(s.caption):
            out.append(s)
    return out


# -- 1. tokenizer ---------------------------------------------------------------------------------
def _byte_chars() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values (the base alphabet of the BPE)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, n = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + n))
            n += 1
    return chars


def write_tokenizer(folder: Path) -> Any:
    """Write vocab.json/merges.txt/tokenizer_config.json where every world word is one token."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for c in _byte_chars():
        vocab.setdefault(c, len(vocab))
    for c in _byte_chars():
        vocab.setdefault(c + "</w>", len(vocab))
    chains: dict[str, list[str]] = {}
    for word in VOCABULARY:
        # merge left to right: "c i" -> "ci", "ci r" -> "cir", ..., "circl e</w>" -> "circle</w>"
        pieces = [*word[:-1], word[-1] + "</w>"]
        left, chain = pieces[0], []
        for right in pieces[1:]:
            chain.append(f"{left} {right}")
            left += right
            vocab.setdefault(left, len(vocab))
        chains[word] = chain
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    cfg = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_TOKENS,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    # BPE applies the best-ranked pair first, so one word's early merge ("r e" of "red") can break
    # another's chain ("g r e e n"). Give a broken word's merges priority until every word is one token.
    order = list(VOCABULARY)
    for _ in range(4 * len(order)):
        merges = list(dict.fromkeys(rule for w in order for rule in chains[w]))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tok = CLIPTokenizer.from_pretrained(str(folder))
        broken = [w for w in order if len(tok(w, add_special_tokens=False)["input_ids"]) != 1]
        if not broken:
            return tok
        order.remove(broken[0])
        order.insert(0, broken[0])
    raise RuntimeError(f"cannot make {broken} single tokens")


# -- 2. models ------------------------------------------------------------------------------------
def build_models(tok: Any, s: Settings) -> tuple[Any, Any, Any]:
    """Fresh (text encoder, VAE, UNet) from configs; weights from the current torch seed."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=s.text_width,
            intermediate_size=2 * s.text_width,
            num_hidden_layers=s.text_layers,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            projection_dim=s.text_width,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),  # one downsampling: 32 -> 16
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=s.vae_channels,
        layers_per_block=1,
        latent_channels=s.latent_channels,
        norm_num_groups=8,
        sample_size=32,
        mid_block_add_attention=False,
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=s.latent_channels,
        out_channels=s.latent_channels,
        block_out_channels=s.unet_channels,
        layers_per_block=1,
        # one level per channel count, cross-attention at each: 16x16, 8x8 (, 4x4)
        down_block_types=("CrossAttnDownBlock2D",) * len(s.unet_channels),
        up_block_types=("CrossAttnUpBlock2D",) * len(s.unet_channels),
        cross_attention_dim=s.text_width,
        attention_head_dim=s.unet_heads,  # diffusers' legacy name: this is the number of heads
        norm_num_groups=8,
    )
    return text_encoder, vae, unet


def scheduler_config(prediction_type: str = "epsilon") -> dict[str, Any]:
    """DDPM's linear schedule (made for 32x32 images); DDIM with trailing spacing samples in 20 steps."""
    return {
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "trailing",
        "prediction_type": prediction_type,
    }


def _images(scenes: list[Scene]) -> torch.Tensor:
    """(N, 3, 32, 32) in [-1, 1], the VAE's range."""
    return torch.from_numpy(np.stack([sc.image for sc in scenes])).permute(0, 3, 1, 2) * 2 - 1


def lr_at(step: int, s: Any, total: int) -> float:
    """Linear warm-up over `s.warmup` steps, then cosine decay from `s.lr` to 0 at `total`."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    return s.lr * 0.5 * (1 + math.cos(math.pi * (step - s.warmup) / max(1, total - s.warmup)))


def train_vae(vae: Any, rng: np.random.Generator, s: Settings, log: Any) -> float:
    """Reconstruction (L1 + MSE) with a tiny KL term; returns the final reconstruction MSE."""
    opt = torch.optim.AdamW(vae.parameters(), lr=s.lr, weight_decay=0.0)
    vae.train()
    mse = float("nan")
    for step in range(s.vae_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s, s.vae_steps)
        x = _images([sample_scene(rng) for _ in range(s.vae_batch)])
        post = vae.encode(x).latent_dist
        z = post.sample()
        if s.decoder_noise:
            sigma = torch.rand(z.shape[0], 1, 1, 1) * s.decoder_noise * z.detach().std()
            z = z + sigma * torch.randn_like(z)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mse = float(F.mse_loss(rec.detach(), x))
        if step % 100 == 0 or step == s.vae_steps - 1:
            log(f"vae {step:5d}/{s.vae_steps} mse {mse:.4f} kl {float(kl.detach()):.3f}")
    vae.eval()
    return mse


def encode_pool(vae: Any, scenes: list[Scene]) -> torch.Tensor:
    """Latent means of the scenes, unscaled (N, C, 16, 16)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(scenes), 256):
            out.append(vae.encode(_images(scenes[i : i + 256])).latent_dist.mean)
    return torch.cat(out)


class KeepCrossProbs:
    """Training-time cross-attention processor that also keeps its probabilities (with gradients).

    Only used while training, for the attention loss; the shipped UNet has diffusers' default processors.
    """

    def __init__(self, store: list[torch.Tensor]) -> None:
        self.store = store

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None, **_: Any) -> Any:
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, None)  # (batch * heads, pixels, tokens)
        self.store.append(probs.view(hidden_states.shape[0], attn.heads, *probs.shape[1:]).mean(1))
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def attention_targets(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scene and object (up to 3): the token positions of its colour and shape words (-1: none),
    and its mask on the 16x16 latent grid (share of each 2x2 pixel block covered)."""
    pos = torch.full((len(scenes), 3, 2), -1, dtype=torch.long)
    masks = torch.zeros(len(scenes), 3, 16 * 16)
    for i, sc in enumerate(scenes):
        words = sc.caption.split()
        colours = [j + 1 for j, w in enumerate(words) if w in COLOURS]  # +1: the start token
        shapes = [j + 1 for j, w in enumerate(words) if w in SHAPES]
        for k, obj in enumerate(sc.objects):  # caption order is object order
            pos[i, k] = torch.tensor([colours[k], shapes[k]])
            m = torch.from_numpy(obj.mask.astype(np.float32)).view(16, 2, 16, 2).mean((1, 3))
            masks[i, k] = m.flatten()
    return pos, masks


def train_diffusion(
    unet: Any,
    text_encoder: Any,
    tok: Any,
    latents: torch.Tensor,
    scenes: list[Scene],
    s: Settings,
    gen: torch.Generator,
    log: Any,
) -> tuple[Any, Any]:
    """Joint UNet + text-encoder training; returns the EMA copies (what ships).

    Loss: the diffusion loss (`prediction_type`) plus `attention_loss` x the share of each object word's
    cross-attention (16x16 layers, head mean) that falls outside its object's mask (TokenCompose's token
    loss), `coverage_loss` x the KL from the object's normalised mask to that map, and
    `uncond_attention_loss` x how far the dropped captions' maps are from flat.
    """
    captions = [sc.caption for sc in scenes]
    obj_pos, obj_masks = attention_targets(scenes)
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**{k: v for k, v in scheduler_config(s.prediction_type).items() if k != "set_alpha_to_one"})
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    ids_all = tok(captions, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.01)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    store: list[torch.Tensor] = []
    keeper = KeepCrossProbs(store)
    problem = bad_choice(s)
    if problem:
        raise ValueError(problem)
    full_res = ("down_blocks.0.", f"up_blocks.{len(s.unet_channels) - 1}.")  # the 16x16 levels
    every = "each" in (s.uncond_layers, s.attention_layers)
    procs = {
        name: keeper if name.endswith("attn2.processor") and (every or name.startswith(full_res)) else p
        for name, p in unet.attn_processors.items()
    }
    unet.set_attn_processor(procs)  # the EMA copy (what ships) keeps the default processors
    unet.train()
    text_encoder.train()
    t0 = time.perf_counter()
    for step in range(s.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s, s.steps)
        idx, x0, ids, drop = sample_batch(latents, ids_all, empty, s, gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (s.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = sched.add_noise(x0, noise, t)
        cond = text_encoder(ids).last_hidden_state
        store.clear()
        pred = unet(xt, t, encoder_hidden_states=cond).sample
        # min-SNR-γ weighting: less effort on nearly clean steps, which look alike for any caption
        # (the same weight on x0 error whatever the UNet predicts: eps MSE = snr * x0 MSE, v: (snr+1))
        cap = snr[t].clamp(max=s.min_snr)
        if s.prediction_type == "epsilon":
            target, w = noise, cap / snr[t]
        elif s.prediction_type == "v_prediction":
            target, w = sched.get_velocity(x0, noise, t), cap / (snr[t] + 1)
        else:
            target, w = x0, cap
        if not s.min_snr:
            w = torch.ones_like(w)
        loss = (w.view(-1, 1, 1, 1) * (pred - target) ** 2).mean()
        # attention losses: each object word's map (every layer's, or the 16x16 layers' mean) should sit on its mask
        if s.attention_layers == "each":
            attn_loss, terms = per_layer_attention_losses(store, obj_pos[idx], obj_masks[idx], drop, s)
        else:
            amap = torch.stack([m for m in store if m.shape[1] == 16 * 16]).mean(0)  # (batch, pixels, tokens)
            flat_maps = store if s.uncond_layers == "each" else None
            attn_loss, terms = attention_losses(amap, obj_pos[idx], obj_masks[idx], drop, s, flat_maps)
        for term in terms:  # one by one, in the order the recorded runs added them
            loss = loss + term
        step_and_average(opt, loss, params, ema_params, step, s.ema)
        if step % 100 == 0 or step == s.steps - 1:
            rate = (step + 1) / (time.perf_counter() - t0)
            losses = f"loss {float(loss.detach()):.4f} attn {float(attn_loss.detach()):.3f}"
            log(f"unet {step:5d}/{s.steps} {losses} ({rate:.2f} steps/s)")
    return ema_unet, ema_text


def sample_batch(
    latents: torch.Tensor, ids_all: torch.Tensor, empty: torch.Tensor, s: Any, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pool indices, latents, token ids, dropped) of one batch; `caption_dropout` of the captions become
    the empty prompt's `empty` ids, so classifier-free guidance has an unconditional model to subtract."""
    idx = torch.randint(0, len(latents), (s.batch,), generator=gen)
    ids = ids_all[idx].clone()
    drop = torch.rand(s.batch, generator=gen) < s.caption_dropout
    ids[drop] = empty
    return idx, latents[idx], ids, drop


def attention_losses(
    amap: torch.Tensor,
    pos: torch.Tensor,
    masks: torch.Tensor,
    drop: torch.Tensor,
    s: Any,
    flat_maps: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the attention loss alone, the weighted attention terms) for one batch; add the terms in order.

    `amap` (batch, pixels, tokens) is the head- and layer-mean map; `pos` (batch, 3, 2) the objects' colour and
    shape token positions (-1: none); `masks` (batch, 3, pixels) their masks on the same grid; `drop` which
    captions were dropped. Terms: `attention_loss` x the share of each object word's map outside its mask,
    `coverage_loss` x the KL from the normalised mask to the normalised map, `uncond_attention_loss` x how far
    each dropped caption's token maps are from flat: of `amap`, or the mean over `flat_maps` (per-layer maps,
    any grid) when given.
    """
    b = amap.shape[0]
    valid = (pos >= 0) & ~drop.view(-1, 1, 1)
    tok_maps = amap.gather(2, pos.clamp(min=0).view(b, 1, 6).expand(-1, amap.shape[1], -1))
    tok_maps = tok_maps.view(b, -1, 3, 2).permute(0, 2, 3, 1)  # (batch, 3, 2, pixels)
    m = masks[:, :, None, :].expand_as(tok_maps)
    inside = (tok_maps * m).sum(-1) / (tok_maps.sum(-1) + 1e-6)
    attn_loss = ((1 - inside) * valid).sum() / valid.sum().clamp(min=1)
    terms = [s.attention_loss * attn_loss]
    if s.coverage_loss:
        p_hat = tok_maps / (tok_maps.sum(-1, keepdim=True) + 1e-6)
        m_hat = m / (m.sum(-1, keepdim=True) + 1e-6)
        kl = (m_hat * (torch.log(m_hat + 1e-8) - torch.log(p_hat + 1e-8))).sum(-1)
        terms.append(s.coverage_loss * (kl * valid).sum() / valid.sum().clamp(min=1))
    if s.uncond_attention_loss and drop.any():
        # each token's map over the pixels, against the uniform map (0 when flat)
        flat_terms = []
        for layer_map in [amap] if flat_maps is None else flat_maps:
            flat = layer_map[drop] / (layer_map[drop].sum(1, keepdim=True) + 1e-6)
            flat_terms.append(((flat * flat.shape[1] - 1) ** 2).mean())
        terms.append(s.uncond_attention_loss * torch.stack(flat_terms).mean())
    return attn_loss, terms


def per_layer_attention_losses(
    maps: list[torch.Tensor], pos: torch.Tensor, masks: torch.Tensor, drop: torch.Tensor, s: Any
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`attention_losses` of each layer's map (batch, g*g, tokens) against the 16x16 `masks` pooled to its
    g x g grid, each term averaged over the layers."""
    results = []
    for layer_map in maps:
        g = math.isqrt(layer_map.shape[1])
        pooled = F.adaptive_avg_pool2d(masks.view(-1, 16, 16), g).reshape(masks.shape[0], masks.shape[1], g * g)
        results.append(attention_losses(layer_map, pos, masks=pooled, drop=drop, s=s))
    attn_loss = torch.stack([r[0] for r in results]).mean()
    terms = [torch.stack(t).mean() for t in zip(*(r[1] for r in results))]
    return attn_loss, terms


def step_and_average(
    opt: Any, loss: torch.Tensor, params: list[Any], ema_params: list[Any], step: int, ema: float
) -> None:
    """One optimiser step (gradients clipped at norm 1), then the EMA copy moves towards the weights."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    decay = min(ema, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, p in zip(ema_params, params):
            pe.lerp_(p, 1 - decay)


# Settings that take one of a few words (checked before any training, wherever they are set).
CHOICES: dict[str, tuple[str, ...]] = {"uncond_layers": ("full", "each"), "attention_layers": ("full", "each")}


def bad_choice(s: Any) -> str | None:
    """One line naming the first setting of `s` whose value is not among its `CHOICES`, or None."""
    for name, allowed in CHOICES.items():
        if hasattr(s, name) and getattr(s, name) not in allowed:
            return f"setting {name}={getattr(s, name)!r}: use one of {', '.join(allowed)}"
    return None


def apply_settings(ap: argparse.ArgumentParser, s: Any, items: list[str]) -> None:
    """Apply `--set NAME=VALUE` items to the settings `s` (tuples as comma lists); unknown names and values
    outside a setting's `CHOICES` exit 2."""
    for item in items:
        name, _, value = item.partition("=")
        if not hasattr(s, name):
            ap.error(f"--set {item}: unknown setting {name!r} (known: {', '.join(asdict(s))})")
        old = getattr(s, name)
        setattr(s, name, tuple(int(v) for v in value.split(",")) if isinstance(old, tuple) else type(old)(value))
    problem = bad_choice(s)
    if problem:
        ap.error(problem)


def seed_run(s: Any) -> tuple[np.random.Generator, torch.Generator]:
    """Seed torch, numpy and a torch generator from `s.seed` and set torch's threads to `s.threads`."""
    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    return np.random.default_rng(s.seed), torch.Generator().manual_seed(s.seed)


class RunLog:
    """Prints each message with the seconds since the run started (flushed: runs are long)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, msg: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {msg}", flush=True)


def write_record(out: Path, record: dict[str, Any], models: dict[str, Any], log: Any) -> None:
    """Write `training.json`: the run's record plus each model's parameter count and the software versions."""
    record["parameters"] = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    record["software"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "transformers": __import__("transformers").__version__,
    }
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    log(f"wrote {out / 'training.json'}")


# -- 5. evaluation --------------------------------------------------------------------------------
def generate(pipe: Any, prompts: list[str], seed: int, steps: int, guidance: float) -> np.ndarray:
    """(N, 32, 32, 3) images in [0, 1], one per prompt, from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = pipe(
            prompts,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gen,
            output_type="np",
            **call_kwargs(pipe),  # the joint model is called as it was trained (no T5 tokens)
        )
    return out.images


def prompt_following(pipe: Any, scenes: list[Scene], seed: int, steps: int, guidance: float) -> dict[str, Any]:
    """Share of generated images holding every named shape in its named colour, overall and by count."""
    from .segment import contains

    prompts = [sc.caption for sc in scenes]
    images = generate(pipe, prompts, seed, steps, guidance)
    hits = [contains(img, parse_prompt(p)) for img, p in zip(images, prompts)]
    by_n: dict[str, list[bool]] = {}
    for p, h in zip(prompts, hits):
        by_n.setdefault(str(len(parse_prompt(p))), []).append(h)
    return {
        "rate": float(np.mean(hits)),
        "n": len(hits),
        "by_objects": {k: float(np.mean(v)) for k, v in sorted(by_n.items())},
    }


def single_object_following(pipe: Any, seed: int, steps: int, guidance: float) -> float:
    """Every colour x shape once ("a red circle", ...): the share generated right."""
    from .segment import contains

    prompts = [f"a {c} {sh}" for c in COLOURS for sh in SHAPES]
    images = generate(pipe, prompts, seed, steps, guidance)
    return float(np.mean([contains(img, parse_prompt(p)) for img, p in zip(images, prompts)]))


# -- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], prog="python -m attntrace.toyworld.train")
    ap.add_argument("--out", required=True, type=Path, help="folder for the from_pretrained pipeline")
    ap.add_argument("--seed", type=int, default=Settings.seed)
    ap.add_argument("--threads", type=int, default=Settings.threads)
    ap.add_argument("--steps", type=int, default=Settings.steps, help="diffusion training steps")
    ap.add_argument("--vae-steps", type=int, default=Settings.vae_steps)
    ap.add_argument("--pool", type=int, default=Settings.pool)
    ap.add_argument("--batch", type=int, default=Settings.batch)
    ap.add_argument("--eval-prompts", type=int, default=Settings.eval_prompts)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="any other setting")
    args = ap.parse_args(argv)
    s = Settings(
        seed=args.seed,
        threads=args.threads,
        steps=args.steps,
        vae_steps=args.vae_steps,
        pool=args.pool,
        batch=args.batch,
        eval_prompts=args.eval_prompts,
    )
    apply_settings(ap, s, args.set)
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    rng, gen = seed_run(s)
    log = RunLog()
    out: Path = args.out

    tok = write_tokenizer(out / "tokenizer")
    text_encoder, vae, unet = build_models(tok, s)
    log(
        "parameters: text encoder {:.2f}M, VAE {:.2f}M, UNet {:.2f}M".format(
            *(sum(p.numel() for p in m.parameters()) / 1e6 for m in (text_encoder, vae, unet))
        )
    )
    vae_mse = train_vae(vae, rng, s, log)
    t_vae = log.elapsed()

    pool: list[Scene] = []
    while len(pool) < s.pool:
        sc = sample_scene(rng)
        if not held_out(sc.caption):
            pool.append(sc)
    raw = encode_pool(vae, pool)
    scaling = float(1.0 / raw.std()) if s.steps else 1.0  # latents of unit variance, as the schedule assumes
    vae.register_to_config(scaling_factor=scaling)
    log(f"encoded {len(pool)} scenes; latent scaling factor {scaling:.4f}")
    ema_unet, ema_text = train_diffusion(unet, text_encoder, tok, raw * scaling, pool, s, gen, log)
    t_train = log.elapsed()

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=ema_text,
        tokenizer=tok,
        unet=ema_unet,
        scheduler=DDIMScheduler(**scheduler_config(s.prediction_type)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(out, safe_serialization=True)
    log(f"saved to {out}")

    scenes = held_out_scenes(s.eval_prompts)
    follow = prompt_following(pipe, scenes, seed=s.seed, steps=s.eval_steps, guidance=s.guidance)
    single = single_object_following(pipe, seed=s.seed, steps=s.eval_steps, guidance=s.guidance)
    log(f"prompt following on {follow['n']} held-out captions: {follow['rate']:.3f} {follow['by_objects']}")
    log(f"single objects (every colour x shape): {single:.3f}")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record = {
        "command": "python -m attntrace.toyworld.train " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": asdict(s),
        "seconds": {
            "vae": round(t_vae, 1),
            "vae_and_diffusion": round(t_train, 1),
            "total_with_eval": round(log.elapsed(), 1),
            "cpu_user": round(usage.ru_utime, 1),
        },
        "vae_reconstruction_mse": round(vae_mse, 5),
        "latent_scaling_factor": scaling,
        "prompt_following": follow,
        "single_object_following": single,
        "eval": {"steps": s.eval_steps, "guidance": s.guidance, "seed": s.seed, "scheduler": "DDIM trailing"},
    }
    write_record(out, record, {"text_encoder": ema_text, "vae": vae, "unet": ema_unet}, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
