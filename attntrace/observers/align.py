"""Token alignment between a source and an edited prompt, as prompt-to-prompt defines it.

- Word swap (`replacement_mapper`): the prompts have the same number of space-separated words; a
  swapped word's tokens take the source word's map, split evenly when its token count changed
  (a float matrix M, new map of target token n = sum_w source map of token w * M[w, n]).
  Prompt-to-prompt walks the tokens after the last swapped word position by position in the *target*
  (M[j, j] = 1), which misplaces them when a swap changed the token count; `shift_after_swap=True`
  follows the shift instead (M[i, j] = 1). The default is prompt-to-prompt's, for parity.
- Refinement (`refinement_mapper`): a global alignment (Needleman-Wunsch: match +1, mismatch -1,
  gap 0; ties prefer an insertion, then a deletion, then the diagonal) of the two token-id sequences;
  each target token takes the aligned source token's map, and new tokens (alpha 0) keep their own.

Written from the paper's and the reference code's definitions; positions come from
`attntrace.words`, so any tokenizer with offsets (CLIP, T5, BERT...) works.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.errors import ConfigError
from ..core.words import token_ids, whitespace_word_tokens

__all__ = ["refinement_mapper", "replacement_mapper"]


def replacement_mapper(
    tokenizer: Any, source: str, target: str, length: int, *, shift_after_swap: bool = False
) -> torch.Tensor:
    """(length, length) float matrix: row = source token, column = target token."""
    src_words, dst_words = source.split(" "), target.split(" ")
    if len(src_words) != len(dst_words):
        raise ConfigError(
            f"a word swap (replace) needs prompts with the same number of words: {source!r} has {len(src_words)}, "
            f"{target!r} has {len(dst_words)}; use mode: refine for prompts that add or remove words",
            field="mode",
        )
    swapped = [i for i, (a, b) in enumerate(zip(src_words, dst_words)) if a != b]
    src_tokens = whitespace_word_tokens(tokenizer, source, max_length=length)
    dst_tokens = whitespace_word_tokens(tokenizer, target, max_length=length)
    pairs = [(src_tokens[w], dst_tokens[w]) for w in swapped if src_tokens[w] and dst_tokens[w]]
    mapper = torch.zeros(length, length, dtype=torch.float64)
    i = j = k = 0
    while i < length and j < length:
        if k < len(pairs) and pairs[k][0][0] == i:
            s, d = pairs[k]
            if len(s) == len(d):
                mapper[s, d] = 1.0
            else:
                for t in d:
                    mapper[s, t] = 1.0 / len(d)
            k += 1
            i += len(s)
            j += len(d)
        elif k < len(pairs):
            mapper[i, j] = 1.0
            i += 1
            j += 1
        else:
            mapper[i if shift_after_swap else j, j] = 1.0
            i += 1
            j += 1
    return mapper.float()


def _global_align(x: list[int], y: list[int]) -> list[tuple[int, int]]:
    """For each token of y, in order: (its index, the aligned index in x or -1)."""
    n, m = len(x), len(y)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    move = [[0] * (m + 1) for _ in range(n + 1)]  # 1 left (insert y), 2 up (skip x), 3 diagonal
    for j in range(1, m + 1):
        move[0][j] = 1
    for i in range(1, n + 1):
        move[i][0] = 2
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            best = max(left, up, diag)
            score[i][j] = best
            move[i][j] = 1 if best == left else 2 if best == up else 3
    pairs: list[tuple[int, int]] = []
    i, j = n, m
    while i > 0 or j > 0:
        if move[i][j] == 3:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif move[i][j] == 1:
            j -= 1
            pairs.append((j, -1))
        else:
            i -= 1
    pairs.reverse()
    return pairs


def refinement_mapper(tokenizer: Any, source: str, target: str, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mapper, alphas), each of `length`: the source token feeding each target token (-1: none, its own
    map is kept: alpha 0). Positions past the target's tokens map past the source's, as in P2P."""
    x, y = token_ids(tokenizer, source), token_ids(tokenizer, target)
    if len(x) > length or len(y) > length:
        raise ConfigError(f"a prompt has more tokens than the text encoder's {length}; shorten it", field="prompt")
    pairs = _global_align(x, y)
    mapper = torch.zeros(length, dtype=torch.int64)
    alphas = torch.ones(length)
    for j, (_, i) in enumerate(pairs):
        mapper[j] = i
        alphas[j] = float(i != -1)
    mapper[len(pairs) :] = len(y) + torch.arange(length - len(y))
    return mapper, alphas
