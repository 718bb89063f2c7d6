"""Reliability of the core: error policies, attach/detach safety, threads, leaks, and hostile configs."""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tiny import classic_unet, run, sd15_unet

from attntrace import AttachError, ConfigError, EditError, Observer, TraceConfig, Tracer


def processors(model: torch.nn.Module) -> dict[str, Any]:
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}


class Boom(Observer):
    """Raises at its `n`-th call."""

    def __init__(self, n: int = 0, where: str = "call") -> None:
        super().__init__()
        self.n, self.calls, self.where = n, 0, where

    def on_call(self, call):
        self.calls += 1
        if self.calls > self.n:
            raise RuntimeError(f"boom at {call.site}")


class Counter(Observer):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def on_call(self, call):
        self.calls += 1


class WrongProbs(Observer):
    """An editor assigning probabilities of the wrong shape."""

    needs = frozenset({"probs"})
    edits = True

    def on_call(self, call):
        call.probs = call.probs[..., :-1]


@pytest.fixture(scope="module")
def unet():
    return sd15_unet()


# -- error policies ------------------------------------------------------------------------------


@pytest.mark.parametrize("builder", [sd15_unet, classic_unet], ids=["sdpa", "classic"])
def test_on_error_raise_detaches_and_restores_every_processor(builder) -> None:
    model, inputs = builder()
    before = processors(model)
    tracer = Tracer()
    tracer.add(Boom(n=1), match="*attn2")
    with pytest.raises(RuntimeError, match="boom") as info, tracer.attach(model):
        run(model, inputs)
    assert any("detached" in n for n in getattr(info.value, "__notes__", []))
    after = processors(model)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert tracer.attachment is None
    # The model works untraced and can be traced again.
    reference = run(model, inputs)
    with Tracer({"rules": [{"use": "shapes"}]}).attach(model):
        assert torch.equal(run(model, inputs), reference)


@pytest.mark.parametrize("builder", [sd15_unet, classic_unet], ids=["sdpa", "classic"])
def test_on_error_warn_disables_once_and_others_continue(builder) -> None:
    model, inputs = builder()
    reference = run(model, inputs)
    tracer = Tracer({"on_error": "warn"})
    boom = tracer.add(Boom(n=0), match="*")
    counter = tracer.add(Counter(), match="*")
    with warnings.catch_warnings(record=True) as caught, tracer.attach(model):
        warnings.simplefilter("always")
        out1 = run(model, inputs)
        out2 = run(model, inputs)
    ours = [w for w in caught if "attntrace" in str(w.message)]
    assert len(ours) == 1 and "boom" in str(ours[0].message) and "step 0" in str(ours[0].message)
    assert boom.calls == 1  # disabled after its first failure
    n_sites = len(Tracer().sites(model))
    assert counter.calls == 2 * n_sites  # the other observer saw every call of both forwards
    assert torch.equal(out1, reference) and torch.equal(out2, reference)


@pytest.mark.parametrize("builder", [sd15_unet, classic_unet], ids=["sdpa", "classic"])
def test_edit_error_while_probs_are_computed(builder) -> None:
    model, inputs = builder()
    before = processors(model)
    tracer = Tracer()
    tracer.add(WrongProbs(), match="*attn1")
    with pytest.raises(EditError, match=r"call\.probs must have shape"), tracer.attach(model):
        run(model, inputs)
    after = processors(model)
    assert all(after[k] is before[k] for k in before)
    # warn policy: the editor is disabled, the forward completes unedited.
    reference = run(model, inputs)
    tracer = Tracer({"on_error": "warn"})
    tracer.add(WrongProbs(), match="*attn1")
    with pytest.warns(RuntimeWarning, match="EditError"), tracer.attach(model):
        out = run(model, inputs)
    assert torch.allclose(out, reference, atol=1e-5)


def test_exception_inside_editor_after_partial_edit(unet) -> None:
    model, inputs = unet
    reference = run(model, inputs)

    class HalfEdit(Observer):
        edits = True

        def on_call(self, call):
            call.query = call.query * 0  # an edit, then a failure: the call must not keep a half edit
            raise ValueError("editor failed")

    tracer = Tracer({"on_error": "warn"})
    tracer.add(HalfEdit(), match="*attn2")
    with pytest.warns(RuntimeWarning, match="editor failed"), tracer.attach(model):
        run(model, inputs)
        second = run(model, inputs)
    assert torch.equal(second, reference)  # disabled from then on: the next step is untouched


# -- attach / detach safety ----------------------------------------------------------------------


def test_double_attach_and_detach_without_attach(unet) -> None:
    model, _ = unet
    before = processors(model)
    tracer = Tracer({"rules": [{"use": "shapes"}]})
    tracer.detach()  # without attach: a no-op
    with tracer.attach(model):
        during = processors(model)
        with pytest.raises(AttachError, match="already attached"):
            tracer.attach(model)
        with pytest.raises(AttachError, match="already traced by another tracer"):
            Tracer().attach(model)
        assert all(processors(model)[k] is during[k] for k in during)  # untouched by the failed attaches
    tracer.detach()
    tracer.detach()
    assert all(processors(model)[k] is before[k] for k in before)


def test_attach_to_model_without_sites() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.raises(AttachError, match="no attention sites"):
        Tracer().attach(model)
    with pytest.raises(AttachError, match="cannot trace a int"):
        Tracer().attach(3)


def test_dtype_change_while_attached_is_bit_identical() -> None:
    model, inputs = sd15_unet()
    plain, _ = sd15_unet()
    plain = plain.to(torch.float64)
    inputs64 = {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in inputs.items()}
    tracer = Tracer({"rules": [{"use": "shapes"}]})
    probe = tracer.add(Counter(), match="*attn2")

    class ReadAll(Observer):
        needs = frozenset({"probs", "output"})

        def on_call(self, call):
            assert call.query.dtype == torch.float64
            call.probs, call.output  # noqa: B018 - force the lazy computations

    tracer.add(ReadAll(), match="*")
    with tracer.attach(model):
        model.to(torch.float64)
        traced = run(model, inputs64)
    assert probe.calls > 0
    assert torch.equal(traced, run(plain, inputs64))


def test_user_replaces_processors_while_attached(unet) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    model, _ = unet
    original = dict(model.attn_processors)
    tracer = Tracer({"rules": [{"use": "shapes"}]})
    att = tracer.attach(model)
    mine = AttnProcessor2_0()
    model.set_attn_processor(mine)
    with pytest.warns(RuntimeWarning):
        att.detach()
    assert all(p is mine for p in processors(model).values())  # the user's choice is kept
    model.set_attn_processor(original)  # put the shared fixture back as it was
    assert all(processors(model)[k[: -len(".processor")]] is p for k, p in original.items())


def test_two_tracers_two_models_two_threads() -> None:
    (m1, in1), (m2, _) = sd15_unet(), sd15_unet()
    torch.manual_seed(1)
    in2 = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in in1.items()}
    expected = [run(m1, in1), run(m2, in2)]

    class Means(Observer):
        needs = frozenset({"probs"})

        def __init__(self) -> None:
            super().__init__()
            self.values: list[float] = []

        def on_call(self, call):
            self.values.append(float(call.probs[..., 0].mean()))

    ref_obs = []
    for m, x in ((m1, in1), (m2, in2)):
        t = Tracer()
        ref_obs.append(t.add(Means(), match="*attn2"))
        with t.attach(m):
            run(m, x)
    results: list[Any] = [None, None]
    observers = [Means(), Means()]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def work(i: int, m: torch.nn.Module, x: dict) -> None:
        try:
            t = Tracer()
            t.add(observers[i], match="*attn2")
            with t.attach(m):
                barrier.wait()
                for _ in range(3):
                    results[i] = run(m, x)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=a) for a in ((0, m1, in1), (1, m2, in2))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for i in range(2):
        assert torch.equal(results[i], expected[i])
        assert observers[i].values == ref_obs[i].values * 3  # each tracer saw only its own model


def test_attach_detach_1000_times_leaves_memory_flat(unet) -> None:
    model, inputs = unet
    tracer = Tracer({"rules": [{"use": "shapes", "match": "*attn2"}]})
    tracer.add(Counter(), match="*")

    def cycle(n: int) -> None:
        for _ in range(n):
            with tracer.attach(model):
                pass

    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    cycle(50)  # warm caches
    gc.collect()
    before, rss_before = len(gc.get_objects()), rss_mib()
    cycle(1000)
    gc.collect()
    grown, rss_grown = len(gc.get_objects()) - before, rss_mib() - rss_before
    print(f"after 1000 attach/detach cycles: live gc objects {grown:+d}, RSS {rss_grown:+.1f} MiB")
    assert grown < 200  # flat: not proportional to the 1000 cycles (each cycle creates >100 objects)
    assert rss_grown < 16  # a leak of one binding per cycle would be far larger
    # One traced forward afterwards still works and nothing is left patched.
    with tracer.attach(model):
        run(model, inputs)
    assert not any(type(p).__module__.startswith("attntrace") for p in processors(model).values())


def test_observer_releases_tensors_on_close(unet) -> None:
    import weakref

    model, inputs = unet

    class Keep(Observer):
        needs = frozenset({"probs"})

        def __init__(self) -> None:
            super().__init__()
            self.kept: list[torch.Tensor] = []

        def on_call(self, call):
            self.kept.append(call.probs)

        def close(self) -> None:
            self.kept.clear()

    tracer = Tracer()
    keep = tracer.add(Keep(), match="*attn2")
    with tracer.attach(model):
        run(model, inputs)
    refs = [weakref.ref(t) for t in keep.kept]
    assert refs
    tracer.close()
    gc.collect()
    assert all(r() is None for r in refs)  # nothing else (calls, bindings, attachment) holds them


# -- hostile configuration documents ---------------------------------------------------------------

N_EXAMPLES = 300
tried = {"valid": 0, "rejected": 0}

WORDS = ["*", "", " ", "*attn2", "shapes", "self", "cross", "0:10:2", "-1", "1e99", "::", "a:b:c:d", "raise",
         "warn", "forward", "timestep"]  # fmt: skip
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30), st.floats(allow_nan=True),
    st.text(max_size=12), st.sampled_from(WORDS),
)  # fmt: skip
values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=8,
)
rule_keys = st.sampled_from(["use", "match", "kind", "steps", "with", "name", "bogus", "Use"])
rules = st.one_of(
    st.dictionaries(rule_keys, values, max_size=6),
    st.fixed_dictionaries({"use": st.sampled_from(["shapes", "nope", "", "x:shapes", "attntrace:shapes"])},
                          optional={k: values for k in ("match", "kind", "steps", "with", "name")}),
)  # fmt: skip
documents = st.one_of(
    st.fixed_dictionaries({"rules": st.lists(rules, max_size=3)},
                          optional={k: values for k in ("strict", "on_error", "step_by", "extra")}),
    st.dictionaries(st.text(max_size=8), values, max_size=4),
    values,
)  # fmt: skip

NASTY = [
    "rules: !!python/object/apply:os.system ['echo pwned']\n",
    "!!python/object:attntrace.Tracer {}\n",
    "rules:\n  - use: !!python/name:os.system\n",
    "a: &a ['x','x','x','x','x','x','x','x','x']\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
        f"*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]\n" for i in range(8)),
    "rules: [" * 5000,
    "rules:\n  - use: shapes\n    steps: -3\n",
    "rules:\n  - use: shapes\n    steps: 99999999999999999999999\n",
    "rules:\n  - use: shapes\n    match: ''\n",
    "rules:\n  - use: shapes\n    match: []\n",
    "rules:\n  - use: shapes\n    kind: [self, banana]\n",
    "rules:\n  - use: shapes\n    steps: {start: 5, stop: 2, step: 0}\n",
    "rules:\n  - use: shapes\n    with: {print_table: [1]}\n",
    "rules:\n  - use: shapes\n    steps: '1:2:3:4'\n",
    "\t\x00\x01",
    "- - - -",
    "rules: {use: shapes}",
    "on_error: explode",
    "rules:\n  - {use: shapes, steps: .inf}\n",
    "rules:\n  - {use: shapes, steps: [1, .nan]}\n",
    "rules:\n  - {use: shapes, match: [1, 2]}\n",
    "rules:\n  - {use: shapes, name: {a: 1}}\n",
    "? [a, b]\n: c\n",
    "{[1]: 2}",
]


def alias_bomb(field: str, levels: int = 9) -> str:
    """`levels` levels of nine-fold aliases (9**levels leaves when expanded) used as one rule field."""
    lines = ["  a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(levels - 1):
        lines.append(f"  {chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]")
    return "_anchors:\n" + "\n".join(lines) + f"\nrules:\n  - use: shapes\n    {field}: *{chr(96 + levels)}\n"


@pytest.mark.parametrize("field", ["use", "match", "kind", "steps", "with", "name"])
def test_alias_bomb_in_each_field_is_a_fast_short_config_error(field: str) -> None:
    # Before the bounded repr in config_error_from, printing the offending value took ~100 s per field.
    import time

    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        TraceConfig.from_yaml(alias_bomb(field))
    assert time.perf_counter() - start < 5
    assert "alias bomb" in str(info.value) and len(str(info.value)) < 300  # refused while loading
    # Below the expansion bound (9**4 leaves) the document loads and the error names the field.
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        TraceConfig.from_yaml(alias_bomb(field, levels=4))
    assert time.perf_counter() - start < 5
    assert str(info.value).startswith(f"rules.0.{field}:") and len(str(info.value)) < 300


def check_document(text: str) -> None:
    try:
        TraceConfig.from_yaml(text)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), repr(str(exc))
        tried["rejected"] += 1
    else:
        tried["valid"] += 1


@pytest.mark.parametrize("text", NASTY, ids=range(len(NASTY)))
def test_nasty_documents_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        TraceConfig.from_yaml(text if "\n" in text else text + "\n")


def test_field_paths_are_named() -> None:
    cases = {
        "rules:\n  - use: shapes\n    steps: -3\n": "rules.0.steps",
        "rules:\n  - use: shapes\n  - use: shapes\n    kind: banana\n": "rules.1.kind",
        "rules:\n  - use: shapes\n    with: {print_table: [1]}\n": "rules.0.with.print_table",
        "rules:\n  - use: shapes\n    bogus: 1\n": "rules.0.bogus",
        "on_error: explode\n": "on_error",
        "rules:\n  - use: shapes\n    match: ''\n": "rules.0.match",
    }
    for text, path in cases.items():
        with pytest.raises(ConfigError) as info:
            TraceConfig.from_yaml(text)
        assert str(info.value).startswith(path + ":"), str(info.value)


@settings(max_examples=N_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(documents)
@example({"0\n": None})  # found by hypothesis: a key with a newline made a two-line message
def test_random_documents_only_raise_config_error(doc: Any) -> None:
    try:
        text = yaml.safe_dump(doc, allow_unicode=True)
    except (yaml.YAMLError, ValueError, OverflowError):
        return
    check_document(text)
    if isinstance(doc, dict):  # the same document as a dict (the Python API path)
        with contextlib.suppress(ConfigError):
            TraceConfig(**{str(k): v for k, v in doc.items()})


@settings(max_examples=N_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=200))
def test_mutated_bytes_only_raise_config_error(tmp_path_factory, noise: bytes, at: int) -> None:
    base = b"rules:\n  - use: shapes\n    match: '*attn2'\n    kind: cross\n    steps: '0:10:2'\n"
    data = base[:at] + noise + base[at + len(noise) // 2:]
    path = Path(tmp_path_factory.getbasetemp()) / "mutated.yaml"
    path.write_bytes(data)
    try:
        TraceConfig.from_yaml(path)
        tried["valid"] += 1
    except ConfigError as exc:
        assert "\n" not in str(exc).strip()
        tried["rejected"] += 1
    check_document(data.decode("utf-8", "replace"))


def test_report_examples_tried() -> None:
    print(f"hostile config documents tried: {tried['valid'] + tried['rejected']} "
          f"({tried['rejected']} rejected with ConfigError, {tried['valid']} valid)")  # fmt: skip
