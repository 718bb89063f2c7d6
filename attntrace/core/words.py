"""Words to token positions, with the pipeline's own tokenizer (CLIP, T5, BERT, any HF tokenizer).

Positions are those the text encoder sees: position 0 is the start token where the tokenizer adds
one, and padding follows the prompt's tokens. A word or phrase maps to every token that covers its
characters (a multi-token word gives all of them); a plain word matches every occurrence (as
prompt-to-prompt's `get_word_inds` and DAAM do) and `dog#2` picks the second one only. Matching is by
whole words, case-insensitive; punctuation counts as its own word.

Tokenizers that report character offsets are read through them; others are read by decoding growing
prefixes of the token ids, which gives each token its stretch of the decoded text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

__all__ = ["WordError", "resolve_words", "special_positions", "token_labels"]

_WORD = re.compile(r"\w+|[^\w\s]")
_NTH = re.compile(r"^(.*\S)#(\d+)$")
#: Beyond this a tokenizer's `model_max_length` is a placeholder (T5 reports ~1e30), not a padding length.
_MAX_PAD = 8192


class WordError(ConfigError):
    """A word is not in the prompt (or was cut off by the encoder's length); shows the tokenization."""


@dataclass(frozen=True)
class _Encoded:
    ids: list[int]
    pieces: list[str]
    special: set[int]  # positions of start/end/padding tokens
    text: str  # the text the spans index (the prompt, or its decoded form)
    spans: list[tuple[int, int] | None]  # per position: characters of `text` it covers


def _length(tokenizer: Any, max_length: int | None) -> int | None:
    if max_length is not None:
        return max_length
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if isinstance(n, int) and 0 < n <= _MAX_PAD else None


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    framing = {getattr(tokenizer, f"{n}_token_id", None) for n in ("bos", "eos", "pad", "cls", "sep")}
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk not in framing:  # an unknown word is still a word of the prompt (CLIP's unk is its end token)
        ids.discard(unk)
    return ids


def _encode(tokenizer: Any, prompt: str, max_length: int | None) -> _Encoded:
    if not isinstance(prompt, str):
        raise WordError(f"a prompt must be text, got {type(prompt).__name__}")
    length = _length(tokenizer, max_length)
    pad: dict[str, Any] = {"padding": "max_length", "max_length": length, "truncation": True} if length else {}
    try:
        enc = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=True, **pad)
        offsets = list(enc["offset_mapping"])
    except (NotImplementedError, TypeError, ValueError, KeyError):
        enc, offsets = tokenizer(prompt, add_special_tokens=True, **pad), None
    ids = [int(i) for i in enc["input_ids"]]
    specials = _special_ids(tokenizer)
    special = {i for i, t in enumerate(ids) if t in specials}
    mask = enc.get("attention_mask") if hasattr(enc, "get") else None
    if mask is not None:
        special |= {i for i, m in enumerate(mask) if not m}
    try:
        pieces = [str(p) for p in tokenizer.convert_ids_to_tokens(ids)]
    except (AttributeError, TypeError, ValueError):
        pieces = [str(i) for i in ids]
    spans: list[tuple[int, int] | None] = [None] * len(ids)
    if offsets is not None:
        for pos, (a, b) in enumerate(offsets):
            if pos not in special and b > a:
                spans[pos] = (int(a), int(b))
        return _Encoded(ids, pieces, special, prompt, spans)
    # No offsets: each kept token covers what its id adds to the decoded prefix.
    kept = [pos for pos in range(len(ids)) if pos not in special]
    text, prev = "", ""
    for n, pos in enumerate(kept, 1):
        text = tokenizer.decode([ids[p] for p in kept[:n]])
        if text.startswith(prev) and len(text) > len(prev):
            a = len(prev) + (len(text[len(prev) :]) - len(text[len(prev) :].lstrip()))
            spans[pos] = (a, len(text))
        prev = text
    return _Encoded(ids, pieces, special, text, spans)


def _label(piece: str) -> str:
    for mark in ("</w>",):
        piece = piece.removesuffix(mark)
    for mark in ("▁", "Ġ", "##"):
        piece = piece.removeprefix(mark)
    return piece or "▁"


def token_labels(tokenizer: Any, prompt: str, *, max_length: int | None = None) -> list[str]:
    """One readable label per token position the text encoder sees (special/padding included).

    `max_length` is the encoder's sequence length (a pipeline's `max_sequence_length` for T5);
    by default the tokenizer's `model_max_length` where it is a real length, else no padding.
    """
    enc = _encode(tokenizer, prompt, max_length)
    return [p if i in enc.special else _label(p) for i, p in enumerate(enc.pieces)]


def special_positions(tokenizer: Any, prompt: str, *, max_length: int | None = None) -> set[int]:
    """Positions of start/end/padding tokens (left out of renders by default)."""
    return set(_encode(tokenizer, prompt, max_length).special)


def _shown(enc: _Encoded, limit: int = 40) -> str:
    # The prompt's tokens, with one mark for the run of trailing padding.
    labels = [p if i in enc.special else _label(p) for i, p in enumerate(enc.pieces)]
    last = max((i for i in range(len(labels)) if i not in enc.special), default=-1)
    body = [f"{i}:{labels[i]}" for i in range(min(len(labels), last + 2))]
    if len(body) > limit:
        body = [*body[:limit], "..."]
    rest = len(labels) - (last + 2)
    return " ".join(body) + (f" (+{rest} padding)" if rest > 0 else "")


def _word_spans(text: str) -> list[tuple[int, int, str]]:
    return [(m.start(), m.end(), m.group().lower()) for m in _WORD.finditer(text)]


def resolve_words(
    tokenizer: Any,
    prompt: str,
    words: Sequence[str],
    *,
    max_length: int | None = None,
    field: str | None = None,
) -> list[list[int]]:
    """Token positions of each word or phrase ("red dog", "dog#2" = second occurrence).

    Multi-token words give all their tokens; a plain word gives the tokens of every occurrence.
    Unknown word: `WordError` (a ConfigError) whose one-line message shows the prompt's tokenization.
    """
    if isinstance(words, str):
        words = [words]
    enc = _encode(tokenizer, prompt, max_length)
    spans = _word_spans(enc.text)
    out: list[list[int]] = []
    for word in words:
        if not isinstance(word, str) or not word.strip():
            raise WordError(f"a word must be non-empty text, got {word!r}", field=field)
        m = _NTH.match(word.strip())
        target, nth = (m.group(1), int(m.group(2))) if m else (word.strip(), None)
        query = [w.lower() for w in _WORD.findall(target)]
        hits = [
            (spans[i][0], spans[i + len(query) - 1][1])
            for i in range(len(spans) - len(query) + 1)
            if [s[2] for s in spans[i : i + len(query)]] == query
        ]
        if nth is not None:
            if nth < 1 or nth > len(hits):
                raise WordError(
                    f"{target!r} occurs {len(hits)} time(s) in {prompt!r}, so {word!r} names none; "
                    f"tokens: {_shown(enc)}",
                    field=field,
                )
            hits = [hits[nth - 1]]
        if not hits:
            raise WordError(f"word {target!r} is not in the prompt {prompt!r}; tokens: {_shown(enc)}", field=field)
        positions = sorted(
            {pos for a, b in hits for pos, sp in enumerate(enc.spans) if sp is not None and sp[0] < b and sp[1] > a}
        )
        if not positions:
            raise WordError(
                f"word {target!r} of {prompt!r} lies past the text encoder's {len(enc.ids)} tokens "
                f"(truncated); tokens: {_shown(enc)}",
                field=field,
            )
        out.append(positions)
    return out
