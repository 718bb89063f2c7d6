"""What the maps and edits say, checked on the trained toy-world model against ground truth.

Every check runs on the shipped model (must pass) and on a random-weight twin of the same
architecture (same tokenizer, VAE and scheduler; must fail). Thresholds come from the measurements
recorded in `benchmarks/RESULTS_toyworld.md` (`python benchmarks/toyworld_semantics.py`), with margin.
"""

from __future__ import annotations

from typing import Any

import pytest

from attntrace.toyworld.semantics import measure_ablation, measure_reweight, measure_swap

# Bounds, from benchmarks/RESULTS_toyworld.md (24 held-out captions, seed 0, 20 steps, CFG 5):
# measured on the shipped model / on the random twin -> bound used here.
POINTING_MIN = 0.30  # 0.423 / 0.077
MIOU_MIN = 0.14  # 0.214 / 0.044
NEXT_TOKEN_POINTING_MAX = 0.25  # 0.154 (labels one token late) / 0.000
LABEL_CONTRAST_MIN = 0.15  # cond - one-token-late pointing: 0.269 / 0.077
REWEIGHT_RATIO_MIN = 1.3  # colour share with the colour word x2 over without: 1.570 / 1.034
REWEIGHT_RAISED_MIN = 0.5  # share of prompts whose colour share rose: 0.750 / 0.250
UNCOND_POINTING_MAX = 0.2  # not met: 0.500 (see the xfail below)
SWAP_IOU_MIN = 0.5  # not met: 0.200 (see the xfail below)
SWAP_CHANGED_MIN = 0.75  # not met: 0.000
FOLLOWING_MIN = 0.5  # not met: 0.000 (see the xfail below)

# The shipped model does not yet follow its prompts (prompt following 1% of held-out captions), so the
# checks that need it are strict xfails: they start passing, and then fail as xpass, once it does.
NOT_FOLLOWING = "the shipped model does not follow its prompts yet (benchmarks/RESULTS_toyworld.md)"

# one token position for the colour word of all four (the reweight edit is shared by the batch)
EDIT_PROMPTS = [
    "a red circle left of a yellow square",
    "a blue triangle above a green cross",
    "a green square right of a red circle",
    "a yellow cross below a blue triangle",
]


def _localises(loc: Any) -> bool:
    return loc.cond_pointing >= POINTING_MIN and loc.cond_miou >= MIOU_MIN


def test_enough_objects_to_score(trained_loc: Any) -> None:
    assert trained_loc.n >= 15, f"only {trained_loc.n} generated objects to score"


def test_localisation_pointing_and_iou(trained_loc: Any, random_loc: Any) -> None:
    """Each shape word's map peaks inside its generated object and its top region overlaps it."""
    assert _localises(trained_loc), (trained_loc.cond_pointing, trained_loc.cond_miou)
    assert not _localises(random_loc), (random_loc.cond_pointing, random_loc.cond_miou)


def test_labels_are_the_words_own_maps(trained_loc: Any, random_loc: Any) -> None:
    """The map labelled "circle" is the circle's: the same maps read one token late do not localise."""
    assert _localises(trained_loc)
    assert trained_loc.next_token_pointing <= NEXT_TOKEN_POINTING_MAX < POINTING_MIN
    assert trained_loc.cond_pointing - trained_loc.next_token_pointing >= LABEL_CONTRAST_MIN
    # the random twin gives no such contrast
    assert random_loc.cond_pointing - random_loc.next_token_pointing < LABEL_CONTRAST_MIN


@pytest.mark.xfail(
    strict=True,
    reason="unconditional rows localise too (0.500): the word-level text "
    "encoder's position embeddings carry the layout the attention loss taught",
)
def test_cfg_conditional_half_localises_unconditional_does_not(trained_loc: Any, random_loc: Any) -> None:
    """Rows [uncond..., cond...]: the conditional rows point at the objects, the unconditional do not."""
    assert trained_loc.uncond_pointing <= UNCOND_POINTING_MAX < POINTING_MIN <= trained_loc.cond_pointing
    # on random weights neither half localises, so the contrast the test relies on is absent
    assert not random_loc.cond_pointing - random_loc.uncond_pointing >= POINTING_MIN - UNCOND_POINTING_MAX


def _swap_ok(res: dict[str, Any]) -> bool:
    return res["mean_iou"] >= SWAP_IOU_MIN and res["changed"] >= SWAP_CHANGED_MIN


@pytest.mark.xfail(strict=True, reason=NOT_FOLLOWING)
def test_word_swap_keeps_layout_changes_word(toy_pipe: Any, random_pipe: Any) -> None:
    """Prompt-to-prompt word swap: masks stay (IoU with the source), the swapped colour/shape appears."""
    res = measure_swap(toy_pipe)
    assert _swap_ok(res), res
    assert not _swap_ok(measure_swap(random_pipe))


def test_reweight_colour_word_raises_its_pixel_share(toy_pipe: Any, random_pipe: Any) -> None:
    res = measure_reweight(toy_pipe, EDIT_PROMPTS, factor=2.0)
    assert res["mean_ratio"] >= REWEIGHT_RATIO_MIN and res["raised"] >= REWEIGHT_RAISED_MIN, res
    rnd = measure_reweight(random_pipe, EDIT_PROMPTS, factor=2.0)
    assert not (rnd["mean_ratio"] >= REWEIGHT_RATIO_MIN and rnd["raised"] >= REWEIGHT_RAISED_MIN), rnd


def test_ablating_every_cross_attention_head_cuts_the_text_off(toy_pipe: Any) -> None:
    """With every cross-attention head zeroed, all prompts give one image (exactly); without, they differ."""
    res = measure_ablation(toy_pipe, EDIT_PROMPTS)
    assert res["max_difference_between_prompts_ablated"] < 1e-6, res
    assert res["max_difference_between_prompts"] > 0.1, res


@pytest.mark.xfail(strict=True, reason=NOT_FOLLOWING)
def test_ablating_every_cross_attention_head_removes_the_prompts_effect(toy_pipe: Any, random_pipe: Any) -> None:
    res = measure_ablation(toy_pipe, EDIT_PROMPTS)
    assert res["following"] >= FOLLOWING_MIN and res["following_ablated"] <= 0.25, res
    assert measure_ablation(random_pipe, EDIT_PROMPTS)["following"] < FOLLOWING_MIN
