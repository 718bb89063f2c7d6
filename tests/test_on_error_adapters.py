"""`on_error: raise|warn` on the transformers adapter (tiny BERT and Llama, sdpa and eager) and the plain
torch adapter (nn.MultiheadAttention and a module calling F.sdpa).

raise: the observer's exception propagates after a clean detach (instance attributes, hooks, configs
and transformers' global registries exactly as before; outputs equal afterwards). warn: one warning
and one log record per failing observer naming site and step; that observer is disabled, the others
keep running, the output is the untraced one. Failures are raised from `on_call`, from inside the
probability computation (a query edited to a wrong head size, then `call.probs`), and from an editor
after a partial edit.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attntrace import EditError, Observer, Tracer

transformers = pytest.importorskip("transformers")

from transformers.masking_utils import AttentionMaskInterface  # noqa: E402
from transformers.modeling_utils import AttentionInterface  # noqa: E402


# -- models ----------------------------------------------------------------------------------------
class SdpaBlock(nn.Module):
    """A self-attention module calling F.scaled_dot_product_attention itself."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class SdpaNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(SdpaBlock(), SdpaBlock())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class MhaNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.attn2 = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn(x, x, x, need_weights=False)[0]
        return self.attn2(y, x, x, need_weights=True)[0]


def _ids() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 60, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def bert(impl: str) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, attn_implementation=impl)  # fmt: skip
    model = transformers.BertModel(cfg).eval()
    kw = _ids()
    return model, lambda: model(**kw).last_hidden_state


def llama(impl: str) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    cfg = transformers.LlamaConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=37, bos_token_id=0, eos_token_id=1,
                                   pad_token_id=0, attn_implementation=impl)  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    kw = {"input_ids": _ids()["input_ids"]}
    return model, lambda: model(**kw).logits


def sdpa_net(impl: str) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    model = SdpaNet().eval()
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(2))
    return model, lambda: model(x)


def mha_net(impl: str) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    model = MhaNet().eval()
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(2))
    return model, lambda: model(x)


BUILDERS = {
    "bert-sdpa": (bert, "sdpa"),
    "bert-eager": (bert, "eager"),
    "llama-sdpa": (llama, "sdpa"),
    "llama-eager": (llama, "eager"),
    "torch-F.sdpa": (sdpa_net, ""),
    "torch-mha": (mha_net, ""),
}


def build(case: str) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    fn, impl = BUILDERS[case]
    torch.manual_seed(0)
    with torch.no_grad():
        return fn(impl)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything an attach may touch: per module the class, instance attributes and hooks; configs;
    transformers' global attention registries; torch function modes."""
    mods = {
        name: (
            type(m),
            sorted(vars(m)),
            {k: v for k, v in vars(m).items() if k in ("forward", "processor", "_forward_pre_hooks_with_kwargs")},
            list(m._forward_hooks),
            list(m._forward_pre_hooks),
        )
        for name, m in model.named_modules()
    }
    cfgs = {
        name: getattr(m.config, "_attn_implementation", None)
        for name, m in model.named_modules()
        if getattr(m, "config", None) is not None
    }
    return {
        "modules": mods,
        "configs": cfgs,
        "attn": sorted(AttentionInterface._global_mapping),
        "masks": sorted(AttentionMaskInterface._global_mapping),
        "modes": torch._C._len_torch_function_stack(),
    }


# -- failing observers -------------------------------------------------------------------------------
class Boom(Observer):
    """Raises from `on_call` once it has seen `n` calls."""

    def __init__(self, n: int = 0) -> None:
        super().__init__()
        self.n, self.calls = n, 0

    def on_call(self, call: Any) -> None:
        self.calls += 1
        if self.calls > self.n:
            raise RuntimeError(f"boom at {call.site}")


class BadQueryThenProbs(Observer):
    """Edits the query to a wrong head size (accepted: same rank and batch), then reads the probabilities:
    the failure happens inside the probability computation."""

    needs = frozenset({"probs"})
    edits = True

    def on_call(self, call: Any) -> None:
        call.query = call.query[..., :-1]
        call.probs  # noqa: B018 - the read is the point


class HalfEdit(Observer):
    """An editor that edits, then fails."""

    edits = True

    def on_call(self, call: Any) -> None:
        call.query = call.query * 0
        raise ValueError("editor failed half-way")


class WrongProbs(Observer):
    """An editor assigning probabilities of the wrong shape (an EditError)."""

    needs = frozenset({"probs"})
    edits = True

    def on_call(self, call: Any) -> None:
        call.probs = call.probs[..., :-1]


class Count(Observer):
    needs = frozenset({"probs", "output"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def on_call(self, call: Any) -> None:
        call.probs, call.output  # noqa: B018 - force both lazy computations
        self.calls.append((call.site, call.step))


FAILURES: dict[str, tuple[Callable[[], Observer], type[BaseException], str]] = {
    "on_call": (lambda: Boom(n=1), RuntimeError, "boom at"),
    "in_probs": (BadQueryThenProbs, RuntimeError, "size|shape|match"),
    "in_editor": (HalfEdit, ValueError, "editor failed half-way"),
    "edit_error": (WrongProbs, EditError, r"call\.probs must have shape"),
}


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("case", list(BUILDERS))
def test_raise_detaches_cleanly(case: str, failure: str) -> None:
    model, forward = build(case)
    with torch.no_grad():
        reference = forward()
    before = snapshot(model)
    make, exc_type, pattern = FAILURES[failure]
    tracer = Tracer()  # on_error: raise is the default
    tracer.add(make())
    tracer.add(Count())
    with torch.no_grad(), pytest.raises(exc_type, match=pattern) as info, tracer.attach(model):
        assert snapshot(model) != before  # really attached
        forward()
        forward()
    notes = getattr(info.value, "__notes__", [])
    assert any("detached" in n and "site" in n and "step" in n for n in notes), notes
    assert tracer.attachment is None
    assert snapshot(model) == before
    with torch.no_grad():
        assert torch.equal(forward(), reference)
    # Attachable again, and a passive trace is still bit-identical.
    tracer = Tracer()
    counter = tracer.add(Count())
    with torch.no_grad(), tracer.attach(model):
        assert torch.equal(forward(), reference)
    assert counter.calls and snapshot(model) == before


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("case", list(BUILDERS))
def test_warn_logs_once_disables_and_continues(case: str, failure: str, caplog: pytest.LogCaptureFixture) -> None:
    model, forward = build(case)
    with torch.no_grad():
        reference = forward()
    before = snapshot(model)
    make, exc_type, _ = FAILURES[failure]
    tracer = Tracer({"on_error": "warn"})
    bad = tracer.add(make(), name="bad")
    other = tracer.add(Boom(n=0), name="other")  # a second failing observer: its own single warning
    counter = tracer.add(Count())
    n_sites = len(tracer.sites(model))
    outputs = []
    with caplog.at_level(logging.WARNING, logger="attntrace"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), tracer.attach(model):
            for _ in range(3):
                outputs.append(forward())
    ours = [str(w.message) for w in caught if str(w.message).startswith("attntrace:")]
    assert len(ours) == 2, ours  # once per failing observer, not once per call or per step
    by_label = {label: [m for m in ours if f"observer {label!r}" in m] for label in ("bad", "other")}
    assert len(by_label["bad"]) == 1 and len(by_label["other"]) == 1
    first_site = tracer.sites(model)[0].name
    assert f"site {first_site!r}" in by_label["other"][0] and "step 0" in by_label["other"][0]
    assert exc_type.__name__ in by_label["bad"][0] and "observer disabled" in by_label["bad"][0]
    assert "site '" in by_label["bad"][0] and "step " in by_label["bad"][0]
    records = [r for r in caplog.records if r.name == "attntrace"]
    assert len(records) == 2 and all("observer disabled" in r.getMessage() for r in records)
    # Disabled from its failure on; the healthy observer saw every call of every forward.
    assert tracer.attachment is None and bad in tracer.observers.values() and other.calls == 1
    assert len(counter.calls) == 3 * n_sites
    assert [s for s, _ in counter.calls] == [s.name for s in tracer.sites(model)] * 3
    # A failed observer's half-done edit is rolled back: no forward (not even the one where it failed)
    # differs from the untraced output.
    for out in outputs:
        assert torch.allclose(out, reference, atol=1e-6, rtol=0), (out - reference).abs().max()
    assert snapshot(model) == before
