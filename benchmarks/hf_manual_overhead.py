"""Cost of the `transformers-manual` interception on a small GPT-Neo (CPU, fp32, no grad).

Compares a plain forward, a forward with a passive observer that reads nothing (the mode is active
at every site), and one that reads `probs` (the softmax output: no recomputation). Run:
`python benchmarks/hf_manual_overhead.py`.
"""

from __future__ import annotations

import time

import torch
from transformers import GPTNeoConfig, GPTNeoModel

from attntrace import Observer, Tracer


class Touch(Observer):
    """Reads probs and keeps one float per call."""

    needs = frozenset({"probs"})

    def __init__(self) -> None:
        super().__init__()
        self.sums: list[float] = []

    def on_call(self, call) -> None:  # type: ignore[no-untyped-def]
        self.sums.append(float(call.probs[0, 0, 0, 0]))


class Nothing(Observer):
    """Reads nothing."""

    def on_call(self, call) -> None:  # type: ignore[no-untyped-def]
        pass


def bench(model: torch.nn.Module, ids: torch.Tensor, reps: int = 30) -> float:
    with torch.no_grad():
        model(ids)
        t0 = time.perf_counter()
        for _ in range(reps):
            model(ids)
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = GPTNeoConfig(vocab_size=1000, hidden_size=256, num_layers=4, num_heads=8,
                       attention_types=[[["global", "local"], 2]], max_position_embeddings=512, window_size=64)
    model = GPTNeoModel(cfg).eval()
    ids = torch.randint(0, 1000, (2, 128))
    rows = [("plain", bench(model, ids))]
    for label, obs in (("passive, reads nothing", Nothing()), ("passive, reads probs", Touch())):
        tracer = Tracer()
        tracer.add(obs)
        with tracer.attach(model):
            rows.append((label, bench(model, ids)))
    rows.append(("plain again", bench(model, ids)))
    print("| GPT-Neo 4x256, batch 2 x 128 tokens, 1 thread | ms / forward |\n|---|---|")
    for label, ms in rows:
        print(f"| {label} | {ms:.2f} |")


if __name__ == "__main__":
    main()
