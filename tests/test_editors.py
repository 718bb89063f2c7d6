"""Editors vs. hand-written reference processors installed with `set_attn_processor` on a fresh model.

Each reference processor recomputes attention from the layer's own projections in plain torch
(softmax(q k^T / sqrt(d)) @ v) and applies the edit itself; the traced model with the editor must
give the same output. A `TorchFunctionMode` counts fused-kernel calls: an editor computes attention
once (probability editors never run the fused kernel at their sites).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from attntrace import ConfigError, Tracer
from attntrace.core.selection import pattern_matches
from tests.tiny import FAMILIES, run

Edit = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, str, int], torch.Tensor]


def softmax_probs(q: torch.Tensor, k: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    return torch.softmax(q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1]) / tau, dim=-1)


class RefProcessor:
    """AttnProcessor2_0's math for the tiny UNet layers; attention from `edit(q, k, v, kind, step)`."""

    def __init__(self, edit: Edit, kind: str, state: dict[str, int]) -> None:
        self.edit, self.kind, self.state = edit, kind, state

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, temb: Any = None, **kw: Any) -> torch.Tensor:  # fmt: skip
        b = hidden_states.shape[0]
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        d = k.shape[-1] // attn.heads
        q, k, v = (t.view(b, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))
        out = self.edit(q, k, v, self.kind, self.state["step"])
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * d).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))


class RefJointProcessor:
    """JointAttnProcessor2_0's math (SD3): joint sequence [image, text]; edit sees (q, k, v, n_image)."""

    def __init__(self, edit: Callable[..., torch.Tensor]) -> None:
        self.edit = edit

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, *a: Any, **kw: Any) -> Any:  # fmt: skip
        b, n_img = hidden_states.shape[:2]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

        q, k = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states))
        v = heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        eq = heads(attn.add_q_proj(encoder_hidden_states))
        ek = heads(attn.add_k_proj(encoder_hidden_states))
        ev = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        q, k, v = torch.cat([q, eq], 2), torch.cat([k, ek], 2), torch.cat([v, ev], 2)
        out = self.edit(q, k, v, n_img)
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1]).to(q.dtype)
        hs, ehs = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            ehs = attn.to_add_out(ehs)
        return attn.to_out[1](attn.to_out[0](hs)), ehs


@functools.cache
def _built(family: str) -> torch.nn.Module:
    return FAMILIES[family]()[0]


def fresh(family: str) -> torch.nn.Module:
    """A fresh copy of the tiny model (same weights, own processors), cheaper than rebuilding."""
    return copy.deepcopy(_built(family))


class CountSDPA(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is F.scaled_dot_product_attention:
            self.n += 1
        return func(*args, **(kwargs or {}))


def sd15_inputs(batch: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return {"sample": torch.randn(batch, 4, 16, 16, generator=g), "timestep": torch.tensor(10),
            "encoder_hidden_states": torch.randn(batch, 7, 32, generator=g)}  # fmt: skip


def traced(editor: str, params: dict[str, Any], match: str, kind: str, inputs: dict[str, Any], steps: int,
           family: str = "sd15") -> tuple[list[torch.Tensor], int]:  # fmt: skip
    model = fresh(family)
    tracer = Tracer({"rules": [{"use": editor, "match": match, "kind": kind, "with": params}]})
    outs = []
    with tracer.attach(model), CountSDPA() as count:
        outs = [run(model, inputs) for _ in range(steps)]
    return outs, count.n


def reference(edit: Edit, match: str, inputs: dict[str, Any], steps: int) -> tuple[list[torch.Tensor], int]:
    model = fresh("sd15")
    state = {"step": 0}
    procs = {}
    for key, proc in model.attn_processors.items():
        site = key.removesuffix(".processor")
        kind = "cross" if site.endswith("attn2") else "self"
        procs[key] = RefProcessor(edit, kind, state) if pattern_matches(match, site) else proc
    model.set_attn_processor(procs)
    outs = []
    for i in range(steps):
        state["step"] = i
        outs.append(run(model, inputs))
    return outs, 0


def plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return softmax_probs(q, k) @ v.float()


def check(editor: str, params: dict[str, Any], match: str, kind: str, edit: Edit, *, batch: int = 2,
          steps: int = 1, sdpa_calls: int) -> list[torch.Tensor]:  # fmt: skip
    inputs = sd15_inputs(batch)
    got, n = traced(editor, params, match, kind, inputs, steps)
    want, _ = reference(edit, match, inputs, steps)
    unedited = run(_built("sd15"), inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0], unedited, atol=1e-4), "the edit should change the output"
    assert n == sdpa_calls  # fused-kernel calls over all steps
    return got


# sd15 tiny: 4 self-attention (attn1) and 4 cross-attention (attn2) sites, 8 fused calls per forward.
@pytest.mark.parametrize("renormalize", [False, True])
def test_reweight_sd15(renormalize: bool) -> None:
    tokens, factor = [1, 3], 3.0

    def edit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, step: int) -> torch.Tensor:
        p = softmax_probs(q, k)
        p[..., tokens] *= factor
        if renormalize:
            p = p / p.sum(-1, keepdim=True)
        return p @ v.float()

    # The 4 edited cross sites never run the fused kernel; the 4 untraced self sites do.
    params = {"tokens": tokens, "factor": factor, "renormalize": renormalize}
    check("reweight", params, "*attn2", "cross", edit, sdpa_calls=4)


def test_reweight_sd3_joint_text_part() -> None:
    tokens, factor = [0, 5], 0.25
    model, inputs = fresh("sd3"), FAMILIES["sd3"]()[1]
    tracer = Tracer()
    tracer.add("reweight", match="*.attn", kind="joint", tokens=tokens, factor=factor, renormalize=True)
    with tracer.attach(model), CountSDPA() as count:
        got = run(model, inputs)
    assert count.n == 1  # only the dual-attention block's untraced attn2 (image self-attention)

    def edit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_img: int) -> torch.Tensor:
        p = softmax_probs(q, k)
        cols = [n_img + t for t in tokens]
        p[:, :, :n_img, cols] *= factor
        p[:, :, :n_img] /= p[:, :, :n_img].sum(-1, keepdim=True)
        return p @ v.float()

    ref = fresh("sd3")
    procs = {key: RefJointProcessor(edit) if key.endswith(".attn.processor") else proc
             for key, proc in ref.attn_processors.items()}  # fmt: skip
    ref.set_attn_processor(procs)
    want = run(ref, inputs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, run(_built("sd3"), inputs), atol=1e-4)


def group_source(batch: int, cfg: bool, source: int) -> list[int]:
    if not cfg:
        return [source] * batch
    h = batch // 2
    return [source] * h + [h + source] * h


@pytest.mark.parametrize("cfg", [False, True])
def test_replace_cross_and_self(cfg: bool) -> None:
    batch, steps, cross_until, self_until, source = 4, 2, 2, 1, 1
    src = group_source(batch, cfg, source)
    if cfg:  # prompt-to-prompt edits only the conditional half: the unconditional rows keep their own maps
        src[: batch // 2] = list(range(batch // 2))

    def edit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, step: int) -> torch.Tensor:
        p = softmax_probs(q, k)
        limit = cross_until if kind == "cross" else self_until
        if step < limit:
            p = p[src]
        return p @ v.float()

    params = {"source": source, "cross_until_step": cross_until, "self_until_step": self_until, "cfg": cfg}
    # step 0: every site edited (no fused call); step 1: only cross edited (the 4 self sites run the kernel).
    got = check("replace", params, "*", "any", edit, batch=batch, steps=steps, sdpa_calls=0 + 4)
    assert len(got) == steps


def test_replace_refine_with_mapper_and_fraction() -> None:
    mapper = [0, 2, 1, -1, 4, -1, 6]

    def edit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, step: int) -> torch.Tensor:
        p = softmax_probs(q, k)
        if kind == "cross" and step < 1:  # steps_fraction 0.5 of 2 total steps
            new = p.clone()
            for j, m in enumerate(mapper):
                if m >= 0:
                    new[1, ..., j] = p[0, ..., m]
            p = new
        return p @ v.float()

    params = {"mode": "refine", "mapper": mapper, "steps_fraction": 0.5, "total_steps": 2}
    # step 0: the 4 cross sites are edited (no fused call); step 1: nothing edited, 8 fused calls.
    inputs = sd15_inputs(2)
    got, n = traced("replace", params, "*attn2", "cross", inputs, 2)
    want, _ = reference(edit, "*attn2", inputs, 2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert n == 4 + 8
    assert not torch.allclose(got[0], run(_built("sd15"), inputs), atol=1e-4)


def test_replace_params_validated() -> None:
    with pytest.raises(ConfigError, match="total_steps"):
        Tracer({"rules": [{"use": "replace", "with": {"steps_fraction": 0.5}}]})
    with pytest.raises(ConfigError, match="within"):
        Tracer({"rules": [{"use": "replace", "with": {"cross_replace_steps": 1.5}}]})
    with pytest.raises(ConfigError, match="within"):
        Tracer({"rules": [{"use": "replace", "with": {"cross_replace_steps": {"default_": 0.8, "dog": [0.5, 0.2]}}}]})
    Tracer({"rules": [{"use": "replace", "with": {"mode": "refine"}}]})  # the aligner makes the mapper


@pytest.mark.parametrize("cfg", [False, True])
def test_kv_inject_sd15(cfg: bool) -> None:
    batch, source, from_step = 4, 1, 1
    src = group_source(batch, cfg, source)

    def edit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, step: int) -> torch.Tensor:
        if kind == "self" and step >= from_step:
            k, v = k[src], v[src]
        return plain(q, k, v)

    params = {"source": source, "from_step": from_step, "cfg": cfg}
    inputs = sd15_inputs(batch)
    got, n = traced("kv_inject", params, "*attn1", "self", inputs, 2)
    want, _ = reference(edit, "*attn1", inputs, 2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    # One fused call per layer call, edited or not: the attention is computed once.
    assert n == 8 * 2
    base = run(_built("sd15"), inputs)
    torch.testing.assert_close(got[0], base, atol=1e-5, rtol=1e-5)  # step 0 is before from_step
    assert not torch.allclose(got[1], base, atol=1e-4)


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_ablate_heads(mode: str) -> None:
    heads = [0, 5]

    def edit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, step: int) -> torch.Tensor:
        out = plain(q, k, v)
        if mode == "zero":
            out[:, heads] = 0
        else:
            out[:, heads] = out[:, heads].mean(-2, keepdim=True)
        return out

    check("ablate", {"heads": heads, "mode": mode}, "*", "any", edit, sdpa_calls=8)


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_temperature(tau: float) -> None:
    def edit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, step: int) -> torch.Tensor:
        p = softmax_probs(q, k)
        p = p ** (1 / tau)  # softmax(s / tau) == softmax(s) ** (1/tau), renormalised
        return (p / p.sum(-1, keepdim=True)) @ v.float()

    check("temperature", {"tau": tau}, "*attn1", "self", edit, sdpa_calls=8)


def test_yaml_and_python_agree() -> None:
    inputs = sd15_inputs(2)
    yaml_text = (
        "rules:\n  - use: ablate\n    match: '*attn2'\n    kind: cross\n"
        "    with: {heads: [1, 2], mode: mean}\n"
    )
    m1 = fresh("sd15")
    with Tracer(yaml_text).attach(m1):
        a = run(m1, inputs)
    m2 = fresh("sd15")
    tracer = Tracer()
    tracer.add("ablate", match="*attn2", kind="cross", heads=[1, 2], mode="mean")
    with tracer.attach(m2):
        b = run(m2, inputs)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ConfigError, match=r"rules\.0\.with"):
        Tracer("rules:\n  - use: ablate\n    with: {heads: [0], mode: halve}\n")
