"""LoRA (peft), IP-Adapter and ControlNet pipelines under the tracer, from weights saved locally in the test.

LoRA and IP-Adapter weights are made with peft/diffusers APIs on a separate copy of the denoiser, saved
with the pipeline's own `save_lora_weights` / safetensors, and loaded back through the public loaders
(`load_lora_weights`, `load_ip_adapter`): no hub, no hand-patched modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.runtime import harness, pipes

peft = pytest.importorskip("peft")

EDIT = {"sd": "*attn2", "flux": "transformer_blocks.1.attn"}


def _save_lora(family: str, folder: Path, seed: int) -> None:
    """A rank-4 LoRA on q/k/v/out of a fresh denoiser, saved with `save_lora_weights`."""
    from peft.utils import get_peft_model_state_dict

    build, _ = pipes.PIPES[family]
    donor = build()
    denoiser = donor.unet if family == "sd" else donor.transformer
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                             init_lora_weights=False)  # fmt: skip
    denoiser.add_adapter(config)
    layers = get_peft_model_state_dict(denoiser)
    key = "unet_lora_layers" if family == "sd" else "transformer_lora_layers"
    type(donor).save_lora_weights(folder, **{key: layers})


@pytest.mark.feature("LoRA (peft): load_lora_weights, set_adapters, fuse/unfuse", "adapters")
@pytest.mark.parametrize("family", ["sd", "flux"])
def test_lora(family: str, tmp_path: Path) -> None:
    """Two LoRAs saved locally, `load_lora_weights(adapter_name=...)`, `set_adapters([...], adapter_weights=[0.7,
    0.4])`, then `fuse_lora` and `unfuse_lora`: each state checked; detach leaves peft's layers (active adapters,
    scalings, merged list) as they were; the LoRA changes the images."""
    build, call = pipes.PIPES[family]
    pipe = build()
    base = call(pipe)
    for name, seed in (("a", 1), ("b", 2)):
        _save_lora(family, tmp_path / name, seed)
        pipe.load_lora_weights(tmp_path / name, weight_name="pytorch_lora_weights.safetensors", adapter_name=name)
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.4])
    assert not torch.equal(call(pipe), base)
    harness.check_feature(pipe, call, edit=EDIT[family])
    unfused = call(pipe)
    pipe.fuse_lora(adapter_names=["a", "b"])
    torch.testing.assert_close(call(pipe), unfused, rtol=1e-3, atol=1e-3)
    harness.check_feature(pipe, call, edit=EDIT[family])
    pipe.unfuse_lora()
    harness.check_feature(pipe, call, edit=EDIT[family])
    pipe.set_adapters("b", adapter_weights=1.0)
    harness.check_feature(pipe, call, edit=EDIT[family])


def _save_sd_ip_adapter(pipe: Any, path: Path, embed_dim: int) -> None:
    from safetensors.torch import save_file

    unet = pipe.unet
    cross = unet.config.cross_attention_dim
    torch.manual_seed(3)
    tensors = {"image_proj.proj.weight": torch.randn(4 * cross, embed_dim) * 0.1,
               "image_proj.proj.bias": torch.randn(4 * cross) * 0.1,
               "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross)}  # fmt: skip
    key_id = 1  # diffusers numbers the cross-attention processors 1, 3, 5...
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
            for proj in ("to_k_ip", "to_v_ip"):
                tensors[f"ip_adapter.{key_id}.{proj}.weight"] = torch.randn(hidden, cross) * 0.2
            key_id += 2
    save_file(tensors, path)


def _save_flux_ip_adapter(pipe: Any, path: Path, embed_dim: int) -> None:
    from safetensors.torch import save_file

    tr = pipe.transformer
    joint = tr.config.joint_attention_dim
    inner = tr.inner_dim
    torch.manual_seed(3)
    tensors = {"image_proj.proj.weight": torch.randn(4 * joint, embed_dim) * 0.1,
               "image_proj.proj.bias": torch.randn(4 * joint) * 0.1,
               "image_proj.norm.weight": torch.ones(joint), "image_proj.norm.bias": torch.zeros(joint)}  # fmt: skip
    for i in range(len(tr.transformer_blocks)):
        for proj in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{i}.{proj}.weight"] = torch.randn(inner, joint) * 0.2
            tensors[f"ip_adapter.{i}.{proj}.bias"] = torch.randn(inner) * 0.1
    save_file(tensors, path)


@pytest.mark.feature("IP-Adapter (load_ip_adapter)", "adapters")
@pytest.mark.parametrize("family", ["sd", "flux"])
def test_ip_adapter(family: str, tmp_path: Path) -> None:
    """IP-Adapter weights in diffusers' checkpoint layout (image projection + per-layer `to_k_ip`/`to_v_ip`) saved
    as safetensors and loaded with `load_ip_adapter(..., image_encoder_folder=None)` (SD) /
    `image_encoder_pretrained_model_name_or_path=None` (Flux); image embeddings passed directly. Its processors
    (`IPAdapterAttnProcessor2_0`, `FluxIPAdapterAttnProcessor`, nn.Modules with weights) make two kernel calls
    per layer; both are seen, and `set_ip_adapter_scale` keeps working through the proxy."""
    build, call = pipes.PIPES[family]
    pipe = build()
    base = call(pipe)
    embed_dim = 12
    path = tmp_path / "ip.safetensors"
    if family == "sd":
        _save_sd_ip_adapter(pipe, path, embed_dim)
        pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip.safetensors", image_encoder_folder=None)
        embeds = {"ip_adapter_image_embeds": [torch.randn(2, 1, embed_dim, generator=torch.Generator().manual_seed(4))]}
    else:
        _save_flux_ip_adapter(pipe, path, embed_dim)
        pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip.safetensors",
                             image_encoder_pretrained_model_name_or_path=None)  # fmt: skip
        g = torch.Generator().manual_seed(4)
        embeds = {"ip_adapter_image_embeds": [torch.randn(1, 1, embed_dim, generator=g)],
                  "negative_ip_adapter_image_embeds": [torch.zeros(1, 1, embed_dim)]}  # fmt: skip
    pipe.set_ip_adapter_scale(0.8)

    def run(p: Any) -> torch.Tensor:
        return call(p, **embeds)

    assert not torch.equal(run(pipe), base)
    denoiser = pipe.unet if family == "sd" else pipe.transformer
    ip = next(p for p in denoiser.attn_processors.values() if "IPAdapter" in type(p).__name__)
    weights = [id(t) for t in ip.parameters()]
    outcome = harness.check_feature(pipe, run, edit=EDIT[family])
    assert outcome.calls_seen > outcome.sites_seen * len(outcome.steps)  # two kernel calls at IP layers
    assert [id(t) for t in ip.parameters()] == weights


@pytest.mark.feature("ControlNet pipeline", "adapters")
def test_controlnet() -> None:
    """`StableDiffusionControlNetPipeline` with `ControlNetModel.from_unet` (zero convolutions randomised so the
    control changes the images): the tracer on the pipeline traces the UNet, whose forward takes the
    ControlNet residuals; a second tracer on `pipe.controlnet` traces the ControlNet's own attention."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from attntrace import Tracer

    sd = pipes.sd()
    torch.manual_seed(5)
    controlnet = ControlNetModel.from_unet(sd.unet, conditioning_embedding_out_channels=(8, 8, 8, 8)).eval()
    with torch.no_grad():
        for m in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            m.weight.normal_(0, 0.1)
    pipe = StableDiffusionControlNetPipeline(**{k: v for k, v in sd.components.items() if k != "image_encoder"},
                                             controlnet=controlnet, requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, pipes.SIZE, pipes.SIZE, generator=torch.Generator().manual_seed(6))

    def run(p: Any) -> torch.Tensor:
        return pipes.sd_call(p, image=image)

    assert not torch.equal(run(pipe), pipes.sd_call(sd))
    harness.check_feature(pipe, run, edit="*attn2")

    ref = run(pipe)
    tracer = Tracer()
    rec = tracer.add(harness.Recorder())
    with tracer.attach(pipe.controlnet):
        out = run(pipe)
    assert torch.equal(out, ref)
    sites = {s.name for s in tracer.sites(pipe.controlnet)}
    assert {s for s, _ in rec.seen} == sites
    assert {t for _, t in rec.seen} == set(range(pipes.SD_STEPS))
