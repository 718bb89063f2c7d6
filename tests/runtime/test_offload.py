"""Offloading, layerwise casting and half-precision pipelines under the tracer (tiny SD and Flux pipelines).

On this CPU-only machine the accelerator is the CPU itself: diffusers' offloading installs its hooks
(accelerate `_hf_hook`s, diffusers `HookRegistry` entries) and moves weights between identical devices,
so the untraced feature run is the reference and every check of `harness.check_feature` applies.
"""

from __future__ import annotations

import pytest
import torch

from tests.runtime import harness, pipes

CPU = torch.device("cpu")


@pytest.mark.feature("enable_model_cpu_offload", "offloading")
@pytest.mark.parametrize("family", ["sd", "flux"])
def test_model_cpu_offload(family: str) -> None:
    """`enable_model_cpu_offload(device="cpu")` (without `device`, diffusers 0.42 raises "requires accelerator"
    on a CPU-only machine): accelerate's module hooks chain the components; attach/detach leave them in place."""
    build, call = pipes.PIPES[family]
    pipe = build()
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.components["unet" if family == "sd" else "transformer"], "_hf_hook")
    harness.check_feature(pipe, call, edit="*attn2" if family == "sd" else "transformer_blocks.0.attn")


@pytest.mark.feature("enable_sequential_cpu_offload", "offloading")
@pytest.mark.parametrize("family", ["sd", "flux"])
def test_sequential_cpu_offload(family: str) -> None:
    """`enable_sequential_cpu_offload()`: every leaf module is offloaded to the meta device and onloaded by an
    accelerate hook per call. On a CPU-only machine (`device="cpu"`) the untraced pipeline already fails: accelerate
    1.15's `set_module_tensor_to_device` hands the offloaded weight map's plain tensor back as the parameter when
    the execution device holds the same storage (its tied-parameter shortcut), and moving that back to `meta` raises
    TypeError. Runs where an accelerator exists."""
    build, call = pipes.PIPES[family]
    pipe = build()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe.enable_sequential_cpu_offload(device=device)
    if device == "cpu":
        with pytest.raises(TypeError, match="requires_grad"):
            call(pipe)  # untraced: accelerate's own failure on CPU, not attntrace's
        pytest.skip("sequential offload cannot run untraced on a CPU-only machine (accelerate 1.15 tied-parameter "
                    "shortcut returns a plain tensor; moving it back to meta raises TypeError)")
    harness.check_feature(pipe, call, edit="*attn2" if family == "sd" else "single_transformer_blocks.1.attn")


@pytest.mark.feature("group offloading", "offloading")
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
@pytest.mark.parametrize("family", ["sd", "flux"])
def test_group_offload(family: str, offload_type: str) -> None:
    """`pipe.enable_group_offload(onload_device=cpu, offload_type=...)` (`num_blocks_per_group=1` for
    block level): diffusers `HookRegistry` hooks on the groups; the registry is the same after detach."""
    build, call = pipes.PIPES[family]
    pipe = build()
    kw = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    pipe.enable_group_offload(onload_device=CPU, offload_device=CPU, offload_type=offload_type, **kw)
    denoiser = pipe.unet if family == "sd" else pipe.transformer
    assert any(getattr(m, "_diffusers_hook", None) is not None for m in denoiser.modules())
    harness.check_feature(pipe, call, edit="*attn2" if family == "sd" else "transformer_blocks.1.attn")


@pytest.mark.feature("group offloading", "offloading")
def test_group_offload_use_stream_needs_an_accelerator() -> None:
    """`use_stream=True` needs a device backend with streams: diffusers 0.42 raises ValueError for a CPU
    onload device (hooks/group_offloading.py), so it is not testable on this machine."""
    pipe = pipes.flux()
    with pytest.raises(ValueError, match="streams"):
        pipe.transformer.enable_group_offload(onload_device=CPU, offload_type="block_level", num_blocks_per_group=1,
                                              use_stream=True)  # fmt: skip
    if not torch.cuda.is_available():
        pytest.skip("use_stream: diffusers requires an onload device with streams (CUDA/XPU); none here")


@pytest.mark.feature("layerwise casting", "precision")
@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("family", ["sd", "flux"])
def test_layerwise_casting_fp8(family: str, compute: torch.dtype) -> None:
    """`enable_layerwise_casting(storage_dtype=float8_e4m3fn, compute_dtype=...)` on the denoiser of a
    pipeline in the compute dtype: weights stored in fp8 are upcast per layer by diffusers hooks; probs
    compared with `probs @ v` at the compute dtype's precision."""
    build, call = pipes.PIPES[family]
    pipe = build().to(compute)
    denoiser = pipe.unet if family == "sd" else pipe.transformer
    denoiser.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute)
    assert any(p.dtype == torch.float8_e4m3fn for p in denoiser.parameters())
    tol = 2e-2 if compute == torch.bfloat16 else 1e-5
    harness.check_feature(pipe, call, edit="*attn2" if family == "sd" else "transformer_blocks.0.attn",
                          probs_tol=tol)  # fmt: skip


@pytest.mark.feature("bfloat16 / float16 pipelines", "precision")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", ["sd", "flux"])
def test_half_precision(family: str, dtype: torch.dtype) -> None:
    """The whole pipeline in bfloat16 or float16 (`pipe.to(dtype)`; CPU has SDPA, conv and matmul kernels for
    both in torch 2.13): q/k/v/output stay in the model's dtype, probs are computed in float32."""
    build, call = pipes.PIPES[family]
    pipe = build().to(dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    harness.check_feature(pipe, call, edit="*attn1" if family == "sd" else "single_transformer_blocks.0.attn",
                          probs_tol=tol)  # fmt: skip
