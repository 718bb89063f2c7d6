"""Benchmark: traced vs untraced vs a copied-processor baseline, interleaved, medians and peak RSS.

    python benchmarks/bench.py --workload W1 --runs 9 --out benchmarks/RESULTS.md

W1: a 35M-parameter SD-style UNet (64/128/256/256, cross-attention dim 256), 32x32 latent, batch 2.
W2: the real-size SD1.5 UNet architecture (random weights), 64x64 latent, batch 2 (slow on CPU).
W3: a 20-step run of the demo pipeline (`attntrace demo`'s tiny SD pipeline, 128 px, CFG 7.5).
W3-sd15: a 10-step run of an SD1.5-architecture pipeline (random weights: SD1.5 UNet, CLIP ViT-L/14
  text encoder, SD VAE) at 256 px with CFG 7.5: the setting of the DAAM / prompt-to-prompt numbers.
Variants run interleaved (A B C ... A B C ...) after one warm-up round each; ratios are to the
untraced model measured in the same run. Peak memory is the peak RSS above the RSS before the run,
sampled every 2 ms by a thread.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from attntrace import AttentionCall, Observer, Tracer, registry
from attntrace.core.errors import UnknownObserverError


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


PROMPT = "a photograph of a red fox sitting on green grass under a blue sky"


def build_sd15_pipeline() -> Any:
    """SD1.5's architecture with random weights (no hub): UNet, CLIP ViT-L/14 text encoder, SD VAE."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from attntrace.bundled import DATA

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).eval()
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    ).eval()  # fmt: skip
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       max_position_embeddings=77, vocab_size=49408, projection_dim=768)
    ).eval()  # fmt: skip
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(DATA / "tokenizer"),
        unet=unet, scheduler=DDIMScheduler.from_pretrained(DATA / "scheduler"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def build_workload(workload: str) -> tuple[torch.nn.Module, Any, Callable[[], Any], str]:
    """(unet, what the tracer attaches to, one run, description)."""
    if workload in ("W1", "W2"):
        unet, inputs = build_unet(workload)
        n = sum(p.numel() for p in unet.parameters()) / 1e6
        latent = inputs["sample"].shape[-1]
        desc = f"UNet {n:.1f}M parameters, {latent}x{latent} latent, batch 2, 77 text tokens, one forward"
        return unet, unet, lambda: unet(**inputs), desc
    if workload == "W3":
        from diffusers import StableDiffusionPipeline

        from attntrace.bundled import build_demo_pipeline

        pipe = StableDiffusionPipeline.from_pretrained(build_demo_pipeline())
        steps, size = 20, 128
    else:  # W3-sd15
        pipe = build_sd15_pipeline()
        steps, size = 10, 256
    pipe.set_progress_bar_config(disable=True)

    def once() -> Any:
        return pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                    generator=torch.Generator().manual_seed(0), output_type="np")  # fmt: skip

    n = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    desc = f"pipeline, UNet {n:.1f}M parameters, {size} px, {steps} steps, CFG 7.5 (batch 2), DDIM"
    return pipe.unet, pipe, once, desc


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
                     attention_mask: Any = None, temb: Any = None, *a: Any, **kw: Any) -> torch.Tensor:  # fmt: skip
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


SAVE_DIR = "/tmp/attntrace-bench-save"


def variants(unet: torch.nn.Module, target: Any) -> dict[str, Callable[[], AbstractContextManager[Any]]]:
    """name -> a context manager factory that sets the variant up around one run."""

    def traced(rules: list[dict[str, Any]], extra: Observer | None = None, kind: str = "any") -> Any:
        def make() -> AbstractContextManager[Any]:
            shutil.rmtree(SAVE_DIR, ignore_errors=True)
            tracer = Tracer({"rules": rules})
            if extra is not None:
                tracer.add(extra, kind=kind)
            return _Closing(tracer, tracer.attach(target))

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
        reweight = {"tokens": [1, 2], "factor": 2.0}
        out["reweight, cross"] = traced([{"use": "reweight", "kind": "cross", "with": reweight}])
    if has("save"):
        save = {"tensors": ["probs"], "head_mean": True, "dtype": "float16", "dir": SAVE_DIR}
        out["save probs fp16 head-mean, cross"] = traced([{"use": "save", "kind": "cross", "with": save}])
        # The same observer with a writer that discards: what is left is the probs/reduction cost, so the
        # difference to the variant above is what disk writes cost the forward.
        out["save probs fp16 head-mean, cross, writes discarded"] = traced([], no_disk_save(**save), kind="cross")
        # Like prompt-to-prompt's AttentionStore: every site, the conditional half of the guidance batch.
        everything = dict(save, cond_half=True)
        out["store everything: save probs fp16 head-mean cond-half, all sites"] = traced(
            [{"use": "save", "with": everything}]
        )

    originals = dict(unet.attn_processors)

    def swap(make_processors: Callable[[], Any]) -> Callable[[], AbstractContextManager[Any]]:
        class Swap(AbstractContextManager[None]):
            def __enter__(self) -> None:
                unet.set_attn_processor(make_processors())

            def __exit__(self, *exc: object) -> None:
                unet.set_attn_processor(dict(originals))

        return Swap

    def floor() -> dict[str, Any]:
        # Explicit attention (the classic processor: baddbmm + softmax + bmm) on the cross sites only:
        # the least any edit of probabilities must compute, with no recording and no edit.
        from diffusers.models.attention_processor import AttnProcessor

        return {k: (AttnProcessor() if k.endswith("attn2.processor") else v) for k, v in originals.items()}

    out["explicit-attention floor, cross"] = swap(floor)
    out["copied processor: record cross maps"] = swap(lambda: copied_processor(True, None))
    out["copied processor: reweight cross"] = swap(lambda: copied_processor(False, [1, 2]))
    return out


def _no_disk_save_class() -> type[Observer]:
    from attntrace.observers.save import Save

    class NoDiskSave(Save):
        """`save` whose writer thread drops every file (isolates the cost of the writes themselves)."""

        name = "save_no_disk"

        def _write(self, item: dict[str, Any]) -> None:
            return None

        def _commit(self) -> None:
            return None

    return NoDiskSave


def no_disk_save(**params: Any) -> Observer:
    return _no_disk_save_class()(**params)


class _Closing(AbstractContextManager[None]):
    """Attach on enter; detach and close (flushes `save`'s writer) on exit, outside the timed region."""

    def __init__(self, tracer: Tracer, attachment: Any) -> None:
        self.tracer, self.attachment = tracer, attachment

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self.attachment.detach()
        self.tracer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workload", choices=["W1", "W2", "W3", "W3-sd15"], default="W1")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    ap.add_argument("--out", type=Path, default=None, help="append a Markdown table here")
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run (default all)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    unet, target, once, desc = build_workload(args.workload)
    table = variants(unet, target)
    if args.only:
        table = {k: v for k, v in table.items() if k == "untraced" or k in args.only}
    times: dict[str, list[float]] = {k: [] for k in table}
    peaks: dict[str, list[int]] = {k: [] for k in table}
    with torch.no_grad():
        for _ in range(args.warmup):
            for make in table.values():
                with make():
                    once()
        for _ in range(args.runs):
            for name, make in table.items():
                with make(), PeakRSS() as mem:
                    t0 = time.perf_counter()
                    once()
                    times[name].append(time.perf_counter() - t0)
                peaks[name].append(mem.peak)
    base = statistics.median(times["untraced"])
    base_mem = statistics.median(peaks["untraced"])
    lines = [
        f"### {args.workload} — {desc}",
        "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.runs} interleaved runs after {args.warmup} warm-up round(s), {time.strftime('%Y-%m-%d')}",
        "",
        "| variant | median s | ratio to untraced | min ratio | peak RSS above start (MiB) | extra vs untraced (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for name in table:
        med = statistics.median(times[name])
        pk = statistics.median(peaks[name])
        lines.append(
            f"| {name} | {med:.4f} | {med / base:.3f} | {min(times[name]) / min(times['untraced']):.3f} | "
            f"{pk / 2**20:.1f} | {(pk - base_mem) / 2**20:+.1f} |"
        )
    publish(lines, args.out)


def publish(lines: list[str], out: Path | None) -> None:
    """Print a result table and append it to `out` (when given)."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        with out.open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
