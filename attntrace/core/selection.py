"""Which observers run where: glob patterns over site names, kinds, and step selections.

Glob semantics (`fnmatch`, case-sensitive, matched against the whole site name):
- `*` matches any run of characters **including dots**, so `up_blocks.*.attn2` matches
  `up_blocks.1.attentions.0.transformer_blocks.0.attn2`, and `*attn2` every `attn2` anywhere;
- `?` matches one character, `[0-3]` one character of a set;
- a trailing `.processor` is dropped, so keys copied from `unet.attn_processors` work.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import ConfigError
from .site import KINDS, Site

__all__ = ["StepSelector", "closest_sites", "kind_matches", "match_sites", "normalize_pattern", "probs_layout_refusal"]


def normalize_pattern(pattern: str) -> str:
    """Strip a trailing `.processor` (diffusers' `attn_processors` keys) and whitespace."""
    pattern = pattern.strip()
    if pattern.endswith(".processor"):
        pattern = pattern[: -len(".processor")]
    return pattern


_compiled: dict[str, re.Pattern[str]] = {}


def _regex(pattern: str) -> re.Pattern[str]:
    rx = _compiled.get(pattern)
    if rx is None:
        rx = _compiled[pattern] = re.compile(fnmatch.translate(pattern))
    return rx


def pattern_matches(pattern: str, name: str) -> bool:
    """Whether one glob matches one site name."""
    return _regex(normalize_pattern(pattern)).match(name) is not None


def kind_matches(kinds: Sequence[str] | None, kind: str) -> bool:
    """`None` or `any` matches every kind."""
    return kinds is None or "any" in kinds or kind in kinds


def match_sites(patterns: Sequence[str], kinds: Sequence[str] | None, sites: Iterable[Site]) -> list[Site]:
    """The sites any pattern matches and whose kind is selected, in model order."""
    return [
        s for s in sites if kind_matches(kinds, s.kind) and any(pattern_matches(p, s.name) for p in patterns)
    ]


def probs_layout_refusal(where: str, label: str, understood: frozenset[str], sites: Sequence[Site]) -> str | None:
    """The one-line refusal of an observer (reading probs, editing, or needing the token layout) matched
    to sites whose probabilities have a layout it does not understand (`Site.probs_layout`), or None."""
    odd = [s for s in sites if s.probs_layout not in understood]
    if not odd:
        return None
    shown = ", ".join(s.name for s in odd[:5]) + (" ..." if len(odd) > 5 else "")
    return (
        f"{where}: observer {label!r} needs a dense token x token probability matrix, but {len(odd)} site(s) give "
        f"{odd[0].probs_layout} probabilities ({odd[0].module_class}: {odd[0].note or odd[0].adapter}): {shown}; "
        f"exclude them from the match or use an observer that reads {odd[0].probs_layout} probs (stats, save)"
    )


def closest_sites(pattern: str, names: Sequence[str], n: int = 3) -> list[str]:
    """Site names most similar to a pattern that matched nothing (for the error message)."""
    probe = normalize_pattern(pattern).replace("*", "").replace("?", "")
    return difflib.get_close_matches(probe, list(names), n=n, cutoff=0.0) if names else []


def validate_kinds(value: object, field: str) -> tuple[str, ...] | None:
    """Accept `self`, `cross`, `joint`, `linear`, `any`, or a list of them."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ConfigError("expected one of self, cross, joint, linear, any (or a list)", field=field)
    out = []
    for item in items:
        if item not in (*KINDS, "any"):
            msg = f"unknown kind {item!r}; use one of self, cross, joint, linear, any"
            raise ConfigError(msg, field=field)
        out.append(item)
    return tuple(out)


@dataclass(frozen=True)
class StepSelector:
    """A set of step indices: everything, an explicit list, or a `start:stop:step` range."""

    start: int = 0
    stop: int | None = None
    stride: int = 1
    explicit: frozenset[int] | None = None

    def __contains__(self, step: object) -> bool:
        if not isinstance(step, int):
            return False
        if self.explicit is not None:
            return step in self.explicit
        if step < self.start or (self.stop is not None and step >= self.stop):
            return False
        return (step - self.start) % self.stride == 0

    @property
    def is_all(self) -> bool:
        """True when every step is selected."""
        return self.explicit is None and self.start == 0 and self.stop is None and self.stride == 1

    @classmethod
    def parse(cls, spec: object, field: str = "steps") -> StepSelector:
        """Parse `None` (all), an int, a list of ints, `"start:stop:step"` or `{start, stop, step}`."""
        if spec is None:
            return cls()
        if isinstance(spec, bool):
            msg = "expected a step, a list of steps or 'start:stop:step', got a boolean"
            raise ConfigError(msg, field=field)
        if isinstance(spec, int):
            return cls(explicit=frozenset({_non_negative(spec, field)}))
        if isinstance(spec, (list, tuple)):
            if not all(isinstance(s, int) and not isinstance(s, bool) for s in spec):
                raise ConfigError("a list of steps must hold integers only", field=field)
            return cls(explicit=frozenset(_non_negative(s, field) for s in spec))
        if isinstance(spec, dict):
            unknown = set(spec) - {"start", "stop", "step"}
            if unknown:
                raise ConfigError(f"unknown keys {sorted(unknown)}; use start, stop, step", field=field)
            return cls._make(spec.get("start"), spec.get("stop"), spec.get("step"), field)
        if isinstance(spec, str):
            parts = spec.split(":")
            if len(parts) == 1 and parts[0].strip().lstrip("-").isdigit():
                return cls(explicit=frozenset({_non_negative(int(parts[0]), field)}))
            if not 2 <= len(parts) <= 3:
                raise ConfigError(f"expected 'start:stop' or 'start:stop:step', got {spec!r}", field=field)
            try:
                nums = [int(p) if p.strip() else None for p in parts]
            except ValueError:
                raise ConfigError(f"expected integers in {spec!r}", field=field) from None
            return cls._make(nums[0], nums[1], nums[2] if len(nums) == 3 else None, field)
        raise ConfigError(
            f"expected a step, a list of steps or 'start:stop:step', got {type(spec).__name__}", field=field
        )

    @classmethod
    def _make(cls, start: object, stop: object, stride: object, field: str) -> StepSelector:
        for name, v in (("start", start), ("stop", stop), ("step", stride)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise ConfigError(f"{name} must be an integer", field=field)
        s = _non_negative(start or 0, field)  # type: ignore[arg-type]
        e = None if stop is None else _non_negative(stop, field)  # type: ignore[arg-type]
        k = 1 if stride is None else stride
        if k <= 0:  # type: ignore[operator]
            raise ConfigError(f"step stride must be positive, got {k}", field=field)
        if e is not None and e <= s:
            raise ConfigError(
                f"the step range {s}:{e} is empty (stop must be greater than start; stop is excluded)", field=field
            )
        return cls(start=s, stop=e, stride=k)  # type: ignore[arg-type]

    def describe(self) -> str:
        """A short human form (`all`, `0:50:5`, `[1, 3]`)."""
        if self.explicit is not None:
            return str(sorted(self.explicit))
        if self.is_all:
            return "all"
        return f"{self.start}:{'' if self.stop is None else self.stop}:{self.stride}"


def _non_negative(v: int, field: str) -> int:
    if v < 0:
        raise ConfigError(f"steps are counted from 0; got {v}", field=field)
    if v > 10**9:
        raise ConfigError(f"step {v} is out of range (at most 1e9)", field=field)
    return v
