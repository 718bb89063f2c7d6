"""Benchmark: traced vs untraced vs a copied-processor baseline, interleaved, medians and peak RSS.

    python benchmarks/bench.py --workload W1 --runs 9 --out benchmarks/RESULTS.md

W1: a 35M-parameter SD-style UNet (64/128/256/256, cross-attention dim 256), 32x32 latent, batch 2.
W2: the real-size SD1.5 UNet architecture (random weights), 64x64 latent, batch 2 (slow on CPU).
Variants run interleaved (A B C ... A B C ...) after one warm-up round each; ratios are to the
untraced model measured in the same run. Peak memory is the peak RSS above the RSS before the run,
sampled every 2 ms by a thread.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from attntrace import AttentionCall, Observer, Tracer, registry
from attntrace.errors import UnknownObserverError


def build_unet(workload: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if workload == "W1":
        unet = UNet2DConditionModel(
            block_out_channels=(64, 128, 256, 256), cross_attention_dim=256, attention_head_dim=8,
            layers_per_block=2, sample_size=32, norm_num_groups=32,
        )  # fmt: skip
        latent, ctx_dim = 32, 256
    else:  # W2: SD1.5 architecture
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        latent, ctx_dim = 64, 768
    unet.eval()
    inputs = {
        "sample": torch.randn(2, 4, latent, latent),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(2, 77, ctx_dim),
    }
    return unet, inputs


class ReadQKV(Observer):
    """Reads q/k/v only (a cheap statistic of the keys): no probabilities."""

    needs = frozenset({"query", "key", "value"})

    def __init__(self) -> None:
        super().__init__()
        self.total = 0.0
        self.n = 0

    def on_call(self, call: AttentionCall) -> None:
        self.n += 1
        self.total += call.query.shape[-2] * call.key.shape[-2]


def copied_processor(record: bool, edit_tokens: list[int] | None, factor: float = 2.0) -> Any:
    """The recipe users write by hand: a copied classic AttnProcessor with explicit probabilities."""
    from diffusers.models.attention_processor import Attention

    class CopiedProcessor:
        def __init__(self) -> None:
            self.maps: dict[int, torch.Tensor] = {}

        def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                     attention_mask: Any = None, temb: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:  # fmt: skip
            residual = hidden_states
            batch_size, sequence_length, _ = (
                hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
            )
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            if attn.group_norm is not None:
                hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
            query = attn.to_q(hidden_states)
            is_cross = encoder_hidden_states is not None
            if encoder_hidden_states is None:
                encoder_hidden_states = hidden_states
            elif attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            key = attn.to_k(encoder_hidden_states)
            value = attn.to_v(encoder_hidden_states)
            query = attn.head_to_batch_dim(query)
            key = attn.head_to_batch_dim(key)
            value = attn.head_to_batch_dim(value)
            attention_probs = attn.get_attention_scores(query, key, attention_mask)
            if is_cross and edit_tokens:
                attention_probs = attention_probs.clone()
                attention_probs[..., edit_tokens] *= factor
            if is_cross and record:
                b = attention_probs.shape[0] // attn.heads
                m = attention_probs.reshape(b, attn.heads, *attention_probs.shape[1:]).mean(1)
                key_ = id(attn)
                self.maps[key_] = self.maps.get(key_, 0) + m
            hidden_states = torch.bmm(attention_probs, value)
            hidden_states = attn.batch_to_head_dim(hidden_states)
            hidden_states = attn.to_out[0](hidden_states)
            hidden_states = attn.to_out[1](hidden_states)
            if attn.residual_connection:
                hidden_states = hidden_states + residual
            return hidden_states / attn.rescale_output_factor

    return CopiedProcessor()


class PeakRSS(AbstractContextManager["PeakRSS"]):
    """Peak resident memory above the level at entry, sampled by a thread."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self) -> PeakRSS:
        self.base = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss() - self.base)


def variants(unet: torch.nn.Module) -> dict[str, Callable[[], AbstractContextManager[Any]]]:
    """name -> a context manager factory that sets the variant up around one forward."""

    def traced(rules: list[dict[str, Any]], extra: Observer | None = None, kind: str = "any") -> Any:
        def make() -> AbstractContextManager[Any]:
            tracer = Tracer({"rules": rules})
            if extra is not None:
                tracer.add(extra, kind=kind)
            return tracer.attach(unet)

        return make

    def has(name: str) -> bool:
        try:
            registry.get(name)
            return True
        except UnknownObserverError:
            return False

    out: dict[str, Callable[[], AbstractContextManager[Any]]] = {
        "untraced": nullcontext,
        "attached, no rule": traced([]),
        "shapes, all sites": traced([{"use": "shapes"}]),
        "q/k/v reader, all sites": traced([], ReadQKV()),
    }
    if has("heatmap"):
        out["heatmap, cross"] = traced([{"use": "heatmap", "kind": "cross", "with": {"skip_lowest": False}}])
    if has("stats"):
        out["stats, self"] = traced([{"use": "stats", "kind": "self"}])
    if has("reweight"):
        out["reweight, cross"] = traced([{"use": "reweight", "kind": "cross", "with": {"tokens": [1, 2], "factor": 2.0}}])
    if has("save"):
        out["save probs fp16 head-mean, cross"] = traced(
            [{"use": "save", "kind": "cross", "with": {"tensors": ["probs"], "head_mean": True, "dtype": "float16",
                                                        "dir": "/tmp/attntrace-bench-save"}}]  # fmt: skip
        )

    originals = dict(unet.attn_processors)

    def baseline(record: bool, tokens: list[int] | None) -> Callable[[], AbstractContextManager[Any]]:
        class Swap(AbstractContextManager[None]):
            def __enter__(self) -> None:
                unet.set_attn_processor(copied_processor(record, tokens))

            def __exit__(self, *exc: object) -> None:
                unet.set_attn_processor(dict(originals))

        return Swap

    out["copied processor: record cross maps"] = baseline(True, None)
    out["copied processor: reweight cross"] = baseline(False, [1, 2])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workload", choices=["W1", "W2"], default="W1")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None, help="append a Markdown table here")
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run (default all)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    unet, inputs = build_unet(args.workload)
    table = variants(unet)
    if args.only:
        table = {k: v for k, v in table.items() if k == "untraced" or k in args.only}
    times: dict[str, list[float]] = {k: [] for k in table}
    peaks: dict[str, list[int]] = {k: [] for k in table}
    with torch.no_grad():
        for name, make in table.items():  # warm-up
            with make():
                unet(**inputs)
        for _ in range(args.runs):
            for name, make in table.items():
                with make(), PeakRSS() as mem:
                    t0 = time.perf_counter()
                    unet(**inputs)
                    times[name].append(time.perf_counter() - t0)
                peaks[name].append(mem.peak)
    base = statistics.median(times["untraced"])
    base_mem = statistics.median(peaks["untraced"])
    lines = [
        f"### {args.workload} — {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.runs} interleaved runs after warm-up",
        "",
        "| variant | median s | ratio to untraced | peak RSS above start (MiB) | extra vs untraced (MiB) |",
        "|---|---|---|---|---|",
    ]
    for name in table:
        med = statistics.median(times[name])
        pk = statistics.median(peaks[name])
        lines.append(
            f"| {name} | {med:.4f} | {med / base:.3f} | {pk / 2**20:.1f} | {(pk - base_mem) / 2**20:+.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with args.out.open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
