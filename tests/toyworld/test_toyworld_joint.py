"""What the maps say on the joint-attention toy model (SD3-style: image and text tokens in one attention).

The heat map reads the image-query x text-key part of every joint block, so these checks fail if the
adapter gets the joint layout wrong: the image and text ranges swapped or shifted, the grid transposed,
or the unconditional half taken for the conditional one. Each runs on the shipped joint model (must
pass) and on a random-weight twin (same tokenizers, VAE and scheduler; must fail). Bounds come from
`benchmarks/RESULTS_toyworld.md` (`python benchmarks/toyworld_semantics.py`), with margin.
"""

from __future__ import annotations

from typing import Any

# measured on the shipped joint model / on its random twin -> bound used here
JOINT_POINTING_MIN = 0.6  # 0.949 / 0.034
JOINT_MIOU_MIN = 0.35  # 0.619 / 0.057
JOINT_NEXT_TOKEN_POINTING_MAX = 0.25  # 0.051 / 0.000
JOINT_LABEL_CONTRAST_MIN = 0.4  # cond - one-token-late pointing: 0.898 / 0.034
JOINT_UNCOND_POINTING_MAX = 0.2  # 0.051 / 0.085


def _localises(loc: Any) -> bool:
    return loc.cond_pointing >= JOINT_POINTING_MIN and loc.cond_miou >= JOINT_MIOU_MIN


def test_joint_model_is_sd3_with_joint_sites(joint_pipe: Any) -> None:
    from attntrace.tracer import Tracer

    sites = Tracer({"rules": []}).sites(joint_pipe)
    kinds = {s.kind for s in sites}
    assert type(joint_pipe.transformer).__name__ == "SD3Transformer2DModel"
    assert kinds == {"joint"}, kinds


def test_joint_enough_objects_to_score(joint_loc: Any) -> None:
    assert joint_loc.n >= 15, f"only {joint_loc.n} generated objects to score"


def test_joint_localisation_pointing_and_iou(joint_loc: Any, random_joint_loc: Any) -> None:
    """Each shape word's map (image queries x that word's text key, every joint block) peaks inside its
    generated object, and its top region overlaps it."""
    assert _localises(joint_loc), (joint_loc.cond_pointing, joint_loc.cond_miou)
    assert not _localises(random_joint_loc), (random_joint_loc.cond_pointing, random_joint_loc.cond_miou)


def test_joint_labels_are_the_words_own_maps(joint_loc: Any, random_joint_loc: Any) -> None:
    """The text range is right to the token: the same maps read one token late do not localise."""
    assert _localises(joint_loc)
    assert joint_loc.next_token_pointing <= JOINT_NEXT_TOKEN_POINTING_MAX < JOINT_POINTING_MIN
    assert joint_loc.cond_pointing - joint_loc.next_token_pointing >= JOINT_LABEL_CONTRAST_MIN
    assert random_joint_loc.cond_pointing - random_joint_loc.next_token_pointing < JOINT_LABEL_CONTRAST_MIN


def test_joint_cfg_conditional_half_localises_unconditional_does_not(joint_loc: Any, random_joint_loc: Any) -> None:
    """Rows [uncond..., cond...]: the conditional rows point at the objects, the unconditional do not
    (the empty prompt names nothing), so a heat map that took the wrong half would fail here."""
    assert joint_loc.uncond_pointing <= JOINT_UNCOND_POINTING_MAX < JOINT_POINTING_MIN <= joint_loc.cond_pointing
    gap = JOINT_POINTING_MIN - JOINT_UNCOND_POINTING_MAX
    assert not random_joint_loc.cond_pointing - random_joint_loc.uncond_pointing >= gap


def test_joint_localisation_fails_on_a_transposed_grid(joint_pipe: Any, prompts: list[str], joint_loc: Any) -> None:
    """The check tells a right grid from a wrong one: the same maps read with rows and columns swapped
    (x for y) stop localising."""
    from attntrace.toyworld.probe import localisation

    n = len(prompts)
    wrong = localisation(
        joint_loc.maps.transpose(-1, -2), prompts, joint_loc.masks, joint_pipe.tokenizer, rows=slice(n, 2 * n)
    )
    assert not (wrong.pointing >= JOINT_POINTING_MIN and wrong.miou >= JOINT_MIOU_MIN), wrong
