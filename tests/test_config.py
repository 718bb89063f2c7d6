"""TraceConfig: YAML loading, field-path errors, step selections, globs."""

from __future__ import annotations

from pathlib import Path

import pytest

from attntrace import ConfigError, TraceConfig, Tracer, UnknownObserverError
from attntrace.core.selection import StepSelector, pattern_matches

GOOD = """
strict: false
rules:
  - use: shapes
    match: ["*attn2", "mid_block.*"]
    kind: [cross, self]
    steps: "0:50:5"
    with: {print_table: true}
"""


def test_from_yaml_text_and_path(tmp_path: Path) -> None:
    path = tmp_path / "trace.yaml"
    path.write_text(GOOD)
    for cfg in (TraceConfig.from_yaml(GOOD), TraceConfig.from_yaml(path), TraceConfig.from_yaml(str(path))):
        assert cfg.strict is False
        rule = cfg.rules[0]
        assert rule.patterns == ["*attn2", "mid_block.*"]
        assert rule.kinds == ("cross", "self")
        assert [s for s in range(20) if s in rule.step_selector] == [0, 5, 10, 15]
        assert rule.with_ == {"print_table": True}
    tracer = Tracer(path)
    assert tracer.observers["shapes"].params.print_table is True


@pytest.mark.parametrize(
    ("text", "field", "fragment"),
    [
        ("rules: [{use: shapse}]", "rules.0.use", "known observers: "),
        ("rules: [{use: shapes, with: {print_table: maybe}}]", "rules.0.with.print_table", "valid boolean"),
        ("rules: [{use: shapes, with: {colour: red}}]", "rules.0.with.colour", "allowed: print_table"),
        ("rules: [{use: shapes, kind: crosss}]", "rules.0.kind", "unknown kind 'crosss'"),
        ("rules: [{use: shapes, steps: '-3:5'}]", "rules.0.steps", "counted from 0"),
        ("rules: [{use: shapes, steps: 'a:b'}]", "rules.0.steps", "expected integers"),
        ("rules: [{use: shapes, match: ''}]", "rules.0.match", "empty glob"),
        ("rules: [{use: shapes, mtch: '*'}]", "rules.0.mtch", "unknown field"),
        ("on_error: explode", "on_error", "'raise' or 'warn'"),
        ("rules: 3", "rules", "valid list"),
    ],
)
def test_errors_name_the_field(text: str, field: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        TraceConfig.from_yaml(text)
    message = str(info.value)
    assert message.startswith(field + ":"), message
    assert fragment in message
    assert "\n" not in message


def test_unknown_observer_in_python_api() -> None:
    with pytest.raises(UnknownObserverError, match="known observers"):
        Tracer().add("no-such-observer")


def test_yaml_python_tags_and_alias_bombs_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid trace config"):
        TraceConfig.from_yaml("rules: !!python/object/apply:os.system ['echo hi']")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")
    )
    with pytest.raises(ConfigError, match="alias"):
        TraceConfig.from_yaml(bomb)
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"rules: [\xff\xfe]")
    with pytest.raises(ConfigError, match="not UTF-8"):
        TraceConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        TraceConfig.from_yaml(tmp_path / "missing.yaml")


def test_step_selector_forms() -> None:
    assert 7 in StepSelector.parse(None)
    assert [s for s in range(6) if s in StepSelector.parse([1, 4])] == [1, 4]
    assert [s for s in range(6) if s in StepSelector.parse(3)] == [3]
    assert [s for s in range(9) if s in StepSelector.parse({"start": 2, "stop": 8, "step": 3})] == [2, 5]
    assert [s for s in range(9) if s in StepSelector.parse("4:")] == [4, 5, 6, 7, 8]
    with pytest.raises(ConfigError):
        StepSelector.parse("0:10:0")


def test_glob_semantics() -> None:
    name = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    assert pattern_matches("up_blocks.*.attn2", name)  # '*' crosses dots
    assert pattern_matches("*attn2", name)
    assert pattern_matches(name + ".processor", name)  # attn_processors keys work
    assert pattern_matches("up_blocks.?.attentions.[0-1].*", name)
    assert not pattern_matches("up_blocks.*.attn1", name)
    assert not pattern_matches("attn2", name)  # anchored at both ends
