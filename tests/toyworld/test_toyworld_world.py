"""The toy world's renderer, segmentation, vocabulary and tokenizer, against their definitions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from attntrace import AttnTraceError
from attntrace.toyworld import (
    COLOURS,
    SHAPES,
    VOCABULARY,
    ToyVocabularyError,
    check_prompt,
    contains,
    find_objects,
    parse_prompt,
    render_scene,
    sample_scene,
)
from attntrace.toyworld.world import shape_mask


def test_shapes_have_their_defined_areas() -> None:
    # Areas of the continuous shapes at side 16: circle pi r^2, square s^2, triangle s^2/2, cross 5/9 s^2.
    expected = {"circle": np.pi * 64, "square": 256.0, "triangle": 128.0, "cross": 256 * 5 / 9}
    for shape, area in expected.items():
        got = shape_mask(shape, 16.0, 16.0, 16.0, side=32).sum()
        assert abs(got - area) / area < 0.12, (shape, got, area)
    tri = shape_mask("triangle", 16.0, 16.0, 16.0, side=32)
    rows = tri.sum(1)
    assert rows[rows > 0][0] < rows[rows > 0][-1]  # apex up: narrow at the top, wide at the bottom


def test_scenes_captions_and_masks_agree() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        sc = sample_scene(rng)
        assert 1 <= len(sc.objects) <= 3
        assert parse_prompt(sc.caption) == [o.words for o in sc.objects]
        for o in sc.objects:
            assert np.allclose(sc.image[o.mask], COLOURS[o.colour])  # every mask pixel has its colour
        union = np.zeros_like(sc.objects[0].mask, dtype=int)
        for o in sc.objects:
            union += o.mask
        assert union.max() == 1  # no overlaps
        outside = sc.image[union == 0]
        assert np.allclose(outside.max(-1), outside.min(-1))  # the background is grey
        if len(sc.objects) == 2:
            a, b = sc.objects
            rel = sc.caption.split(a.shape, 1)[1].split(" a ", 1)[0].strip()
            dx, dy = b.cx - a.cx, b.cy - a.cy
            want = {"left of": dx > 0, "right of": dx < 0, "above": dy > 0, "below": dy < 0}[rel]
            assert want and (abs(dx) >= abs(dy)) == rel.endswith("of")


def test_segmentation_recovers_rendered_objects() -> None:
    rng = np.random.default_rng(5)
    scenes = [sample_scene(rng) for _ in range(60)]
    assert all(contains(sc.image, [o.words for o in sc.objects]) for sc in scenes)
    for sc in scenes[:30]:
        found = {f.colour: f for f in find_objects(sc.image)}
        assert set(found) == {o.colour for o in sc.objects}  # textures never pass for objects
        for o in sc.objects:
            assert (found[o.colour].mask == o.mask).all()


def test_segmentation_rejects_wrong_shape_and_colour() -> None:
    sc = render_scene([("red", "circle", 10.0, 16.0, 12.0), ("blue", "cross", 24.0, 16.0, 11.0)])
    assert contains(sc.image, [("red", "circle"), ("blue", "cross")])
    assert not contains(sc.image, [("red", "square")])
    assert not contains(sc.image, [("green", "circle")])
    assert not contains(np.full((32, 32, 3), 0.5, np.float32), [("red", "circle")])


def test_vocabulary_error_names_the_words() -> None:
    assert check_prompt("a red circle left of a blue square")
    with pytest.raises(ToyVocabularyError, match="dog, purple") as exc:
        check_prompt("a purple dog left of a red circle")
    assert isinstance(exc.value, AttnTraceError)
    assert "\n" not in str(exc.value)


def test_cli_vocabulary_error_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from attntrace.cli import main

    assert main(["demo", "--prompt", "a red dog", "--output", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attntrace: error:") and "dog" in lines[0], err
    assert not (tmp_path / "demo").exists()  # refused before anything ran


def test_shipped_tokenizer_has_one_token_per_word(toy_pipe: object) -> None:
    tok = toy_pipe.tokenizer  # type: ignore[attr-defined]
    assert type(tok).__name__.startswith("CLIPTokenizer")
    for word in VOCABULARY:
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    ids = tok("a red circle left of a blue square")["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[2:4] == ["red</w>", "circle</w>"]
    assert set(SHAPES) <= set(VOCABULARY)
