"""prompt-to-prompt parity: attntrace's built-in editors vs an independent reference of P2P's controllers
(tests/p2p_reference.py, written from the definitions) on the same tiny SD1.5-architecture pipeline,
with the same weights, prompts, start latent and 10 DDIM steps. Final latents must agree to 1e-3; on the
classic attention path (the reference's own baddbmm probabilities) they agree exactly."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from attntrace import Tracer
from tests import p2p_reference as ref
from tests import tiny_pipes

STEPS, SIDE = 10, 16  # 128 px: self maps at 16², 8², 4² queries
SWAP = ["a cat riding a bicycle", "a dog riding a bicycle"]
FRACTION = ["a cat on the grass", "a tiger on the grass"]  # 'tiger' is more tokens than 'cat'
REFINE = ["a dog on grass", "a red dog on grass", "a big red dog on grass"]


@pytest.fixture(scope="module")
def classic() -> Any:
    return tiny_pipes.sd15(classic=True)


@pytest.fixture(scope="module")
def latent() -> torch.Tensor:
    return torch.randn((1, 4, SIDE, SIDE), generator=torch.Generator().manual_seed(0))


def ours(pipe: Any, prompts: list[str], rules: list[dict[str, Any]], latent: torch.Tensor) -> torch.Tensor:
    tracer = Tracer({"rules": rules})
    with tracer.attach(pipe):
        out = pipe(prompts, latents=latent.expand(len(prompts), -1, -1, -1), num_inference_steps=STEPS,
                   guidance_scale=7.5, output_type="latent").images  # fmt: skip
    return out


def swap_ctrl(prompts: list[str], tok: Any, cross: Any = 0.8, self_steps: Any = 0.4, **kw: Any) -> ref.Controller:
    mapper = torch.stack([ref.swap_matrix(prompts[0], p, tok) for p in prompts[1:]])
    alpha = ref.time_alpha(prompts, STEPS, cross, tok)
    return ref.Controller(len(prompts), STEPS, ref.replace_fn(mapper), alpha, self_steps, **kw)


def recipes(tok: Any) -> dict[str, tuple[list[str], ref.Controller, list[dict[str, Any]]]]:
    p2p = {"cross_replace_steps": 0.8, "self_replace_steps": 0.4}
    refine = [ref.refine_maps(REFINE[0], p, tok) for p in REFINE[1:]]
    mapper, alphas = torch.stack([m for m, _ in refine]), torch.stack([a for _, a in refine])
    eq = ref.equalizer(SWAP[1], ["dog"], [2.0], tok)
    swap_map = torch.stack([ref.swap_matrix(*SWAP, tok)])
    window = {"default_": 0.8, "dog": 0.3}
    return {
        "word swap": (SWAP, swap_ctrl(SWAP, tok), [{"use": "replace", "with": p2p}]),
        "word swap, token count changes": (FRACTION, swap_ctrl(FRACTION, tok), [{"use": "replace", "with": p2p}]),
        "word swap, self maps <= 8² only": (
            SWAP, swap_ctrl(SWAP, tok, self_max=64),
            [{"use": "replace", "with": {**p2p, "self_max_queries": 64}}],
        ),
        "refine": (
            REFINE,
            ref.Controller(3, STEPS, ref.refine_fn(mapper, alphas), ref.time_alpha(REFINE, STEPS, 0.8, tok), 0.4),
            [{"use": "replace", "with": {"mode": "refine", **p2p}}],
        ),
        "reweight on replace": (
            SWAP,
            ref.Controller(2, STEPS, ref.reweight_fn(eq, ref.replace_fn(swap_map)),
                           ref.time_alpha(SWAP, STEPS, 0.8, tok), 0.4),
            [{"use": "replace", "with": p2p}, {"use": "reweight", "with": {"words": ["dog"], "factor": 2.0, **p2p}}],
        ),
        "reweight alone": (
            [REFINE[0], REFINE[0]],
            ref.Controller(2, STEPS, ref.reweight_fn(ref.equalizer(REFINE[0], ["grass"], [-1.0], tok)),
                           ref.time_alpha(REFINE[:2], STEPS, 1.0, tok), 0.2),
            [{"use": "reweight", "with": {"words": ["grass"], "factor": -1.0, "cross_replace_steps": 1.0,
                                          "self_replace_steps": 0.2}}],
        ),
        "per-word cross window": (
            SWAP, swap_ctrl(SWAP, tok, dict(window), (0.2, 0.6)),
            [{"use": "replace", "with": {"cross_replace_steps": window, "self_replace_steps": [0.2, 0.6]}}],
        ),
        "local blend": (
            SWAP, swap_ctrl(SWAP, tok, blend=ref.Blend(SWAP, ["cat", "dog"], tok, STEPS, res=SIDE // 4)),
            [{"use": "replace", "with": p2p},
             {"use": "local_blend", "match": "*attn2", "with": {"words": ["cat", "dog"]}}],
        ),
    }  # fmt: skip


NAMES = list(recipes(tiny_pipes.clip_tokenizer()))
UNEDITED: dict[tuple[str, ...], torch.Tensor] = {}  # unedited runs per prompt set, shared by the recipes


@pytest.mark.parametrize("name", NAMES)
def test_parity_classic_path(name: str, classic: Any, latent: torch.Tensor) -> None:
    prompts, controller, rules = recipes(classic.tokenizer)[name]
    want = ref.sample(classic, prompts, controller, latent, STEPS)
    got = ours(classic, prompts, rules, latent)
    key = tuple(prompts)
    if key not in UNEDITED:
        UNEDITED[key] = ours(classic, prompts, [], latent)
    unedited = UNEDITED[key]
    diff = (got - want).abs().max().item()
    print(f"parity {name}: max abs diff {diff:.3g}, edit size {(want - unedited).abs().max().item():.3g}")
    assert diff <= 1e-6, f"{name}: max abs diff {diff}"
    assert (want - unedited).abs().max().item() > 1e-2  # the recipe really edits
    torch.testing.assert_close(got[0], unedited[0], rtol=0, atol=1e-5)  # the source image is untouched


def test_parity_fused_path(latent: torch.Tensor) -> None:
    """On the default (SDPA) processors attntrace keeps the fused kernel where nothing is edited: ≤ 1e-3."""
    fused = tiny_pipes.sd15()
    prompts, controller, rules = recipes(fused.tokenizer)["local blend"]
    want = ref.sample(fused, prompts, controller, latent, STEPS)
    got = ours(fused, prompts, rules, latent)
    print(f"parity fused local blend: max abs diff {(got - want).abs().max().item():.3g}")
    assert (got - want).abs().max().item() <= 1e-3
