"""`TraceConfig`: the pydantic model of a trace (rules of observer x sites x kinds x steps) and YAML loading.

Every validation error becomes one `ConfigError` whose message starts with the field path
(`rules.0.with.max_chunk_mib: ...`). YAML is read with `yaml.safe_load`: tags that construct Python
objects are rejected.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from . import registry
from .core.errors import ConfigError, PluginError, UnknownObserverError
from .core.messages import EMPTY_GLOB, short_repr, unknown_parameter
from .core.selection import StepSelector, validate_kinds

__all__ = ["Rule", "TraceConfig", "config_error_from", "load_yaml", "short_repr", "text_keys"]

MAX_YAML_BYTES = 4 * 2**20


def config_error_from(exc: ValidationError, prefix: str = "") -> ConfigError:
    """Turn pydantic's first error into one `ConfigError` naming the field path."""
    err = exc.errors(include_url=False)[0]
    loc = [_path_part(p) for p in err.get("loc", ()) if not (isinstance(p, str) and _TYPE_TAG.match(p))]
    ctx = err.get("ctx") or {}
    if ctx.get("subpath"):
        loc.append(str(ctx["subpath"]))
    path = ".".join([p for p in [prefix, *loc] if p]) or "(top level)"
    msg = " ".join(str(err.get("msg", "invalid value")).split())  # one line, whatever the cause said
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        msg = "unknown field (check the spelling; see `attntrace schema`)"
    elif kind == "missing":
        msg = "this field is required"
    elif kind not in ("unknown_observer", "observer_params", "plugin", "config"):
        msg = f"{msg} (got {short_repr(err.get('input'))})"
    return ConfigError(msg, field=path)


# pydantic puts union members and validator tags into error locations (`rules.0.kind.str`,
# `steps.list[int]`); they are not fields, so they are cut from the path.
_TYPE_TAG = re.compile(
    r"^(str|int|float|bool|bytes|none|any|[a-z_-]+\[.*\]|function-[a-z]+\[.*|json-or-python.*)$"
)


def _path_part(part: object) -> str:
    """A field-path component; odd keys (empty, blanks, newlines, dots) are quoted: one-line paths."""
    text = str(part)
    if isinstance(part, int) or (text and text.isprintable() and text.strip() == text and "." not in text):
        return text
    return repr(text)


def load_yaml(path_or_text: str | os.PathLike[str], what: str = "YAML") -> Any:
    """Read YAML safely from a file path or a YAML string; errors are `ConfigError`s."""
    text: str
    source = "text"
    is_str = isinstance(path_or_text, str)
    if isinstance(path_or_text, os.PathLike) or (
        is_str and "\n" not in path_or_text and path_or_text.endswith((".yaml", ".yml"))
    ):
        path = Path(path_or_text)
        source = str(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
        if len(raw) > MAX_YAML_BYTES:
            raise ConfigError(f"{what} file {path} is larger than {MAX_YAML_BYTES // 2**20} MiB")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{what} file {path} is not UTF-8 text (byte {exc.start})") from None
    else:
        text = str(path_or_text)
    try:
        data = yaml.load(text, Loader=_SafeNoAliasBombLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"invalid {what} in {source}{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"invalid {what} in {source}: nesting too deep") from None
    return data


class _SafeNoAliasBombLoader(yaml.SafeLoader):
    """`SafeLoader` that refuses documents whose aliases expand to a huge tree ("billion laughs")."""

    max_expanded_nodes = 100_000

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._weights: dict[int, int] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        node = super().compose_node(parent, index)
        if id(node) in self._weights:  # an alias: the anchor's subtree counts again
            weight = self._weights[id(node)]
        else:
            weight = 1
            if isinstance(node, yaml.SequenceNode):
                weight += sum(self._weights.get(id(c), 1) for c in node.value)
            elif isinstance(node, yaml.MappingNode):
                weight += sum(self._weights.get(id(k), 1) + self._weights.get(id(v), 1) for k, v in node.value)
            self._weights[id(node)] = weight
        if weight > self.max_expanded_nodes:
            raise yaml.YAMLError(
                f"aliases expand to more than {self.max_expanded_nodes} nodes: refusing a possible alias bomb"
            )
        return node


def text_keys(data: dict[Any, Any], field: str | None = None) -> dict[str, Any]:
    """`data` if every key is text (so it can be passed as `**data`); otherwise a `ConfigError`."""
    odd = [k for k in data if not isinstance(k, str)]
    if odd:
        got = f"{type(odd[0]).__name__} {short_repr(odd[0], 40)}"
        raise ConfigError(f"keys must be field names (text), got {got}", field=field)
    return data


class Rule(BaseModel):
    """One rule: run observer `use` (with params `with`) at sites matching `match`, of `kind`, at `steps`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    use: str = Field(description="observer name (built-in or plugin; 'dist:name' picks a plugin)")
    match: str | list[str] = Field(default="*", description="glob(s) over site names; '*' crosses dots")
    kind: str | list[str] = Field(default="any", description="self, cross, joint, linear or any (or a list)")
    steps: int | list[int] | str | dict[str, int] | None = Field(
        default=None, description="steps to observe: a step, a list, 'start:stop:step' or {start, stop, step}"
    )
    with_: dict[str, Any] = Field(default_factory=dict, alias="with", description="the observer's parameters")
    name: str | None = Field(default=None, description="label for this rule's results (default: `use`)")

    @field_validator("use")
    @classmethod
    def _known_observer(cls, v: str) -> str:
        if not v.strip():
            raise PydanticCustomError("config", "an observer name is required")
        try:
            registry.get(v)
        except UnknownObserverError as exc:
            raise PydanticCustomError("unknown_observer", str(exc)) from None
        except PluginError as exc:
            raise PydanticCustomError("plugin", str(exc)) from None
        return v

    @field_validator("match")
    @classmethod
    def _patterns(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if not items or any(not p.strip() for p in items):
            raise PydanticCustomError("config", EMPTY_GLOB)
        return v

    @field_validator("kind")
    @classmethod
    def _kinds(cls, v: str | list[str]) -> str | list[str]:
        try:
            validate_kinds(v, "kind")
        except ConfigError as exc:
            raise PydanticCustomError("config", str(exc).removeprefix("kind: ")) from None
        return v

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: Any) -> Any:
        try:
            StepSelector.parse(v)
        except ConfigError as exc:
            raise PydanticCustomError("config", str(exc).removeprefix("steps: ")) from None
        return v

    @field_validator("with_")
    @classmethod
    def _params(cls, v: dict[str, Any], info: Any) -> dict[str, Any]:
        use = info.data.get("use")
        if use is None:
            return v
        obs_cls = registry.get(use)
        try:
            obs_cls.Params.model_validate(v)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            sub = ".".join(str(p) for p in err.get("loc", ()))
            if err.get("type") == "extra_forbidden":
                msg = unknown_parameter(use, obs_cls.Params.model_fields)
            else:
                msg = f"{err.get('msg')} (got {short_repr(err.get('input'))})"
            raise PydanticCustomError("observer_params", msg, {"subpath": sub}) from None
        return v

    @property
    def patterns(self) -> list[str]:
        """The globs as a list."""
        return [self.match] if isinstance(self.match, str) else list(self.match)

    @property
    def kinds(self) -> tuple[str, ...] | None:
        """The selected kinds, or None for any."""
        return validate_kinds(self.kind, "kind")

    @property
    def step_selector(self) -> StepSelector:
        """The parsed step selection."""
        return StepSelector.parse(self.steps)

    @property
    def label(self) -> str:
        """The name results are filed under."""
        return self.name or self.use


class TraceConfig(BaseModel):
    """A whole trace: ordered rules plus policies.

    - `strict`: a pattern that matches no site is an error (False: a warning).
    - `on_error`: `raise` re-raises an observer's exception after detaching; `warn` logs once,
      disables that observer and continues.
    - `step_by`: `forward` counts every top-level forward as a step; `timestep` starts a new step only
      when the timestep changes (pipelines that call the model twice per step for guidance).
    """

    model_config = ConfigDict(extra="forbid")

    rules: list[Rule] = Field(default_factory=list, description="observers to run, in order")
    strict: bool = Field(default=True, description="a pattern that matches no site is an error")
    on_error: Literal["raise", "warn"] = Field(default="raise", description="what an observer error does")
    step_by: Literal["forward", "timestep"] = Field(default="forward", description="what counts as a step")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error_from(exc) from None

    @classmethod
    def coerce(cls, value: TraceConfig | dict[str, Any] | str | os.PathLike[str] | None) -> TraceConfig:
        """Accept a `TraceConfig`, a dict, a YAML path or YAML text, or None (no rules)."""
        if value is None:
            return cls()
        if isinstance(value, TraceConfig):
            return value
        if isinstance(value, dict):
            return cls(**text_keys(value))
        if isinstance(value, (str, os.PathLike)):
            return cls.from_yaml(value)
        raise ConfigError(f"expected a TraceConfig, dict or YAML path, got {type(value).__name__}")

    @classmethod
    def from_yaml(cls, path_or_text: str | os.PathLike[str]) -> TraceConfig:
        """Load from a YAML file path or YAML text (safe loader; field-path errors)."""
        data = load_yaml(path_or_text, "trace config")
        if data is None:
            return cls()
        if isinstance(data, dict) and "trace" in data and "rules" not in data:  # an experiment's trace section
            data = data["trace"] or {}
        if not isinstance(data, dict):
            raise ConfigError(f"a trace config must be a mapping with 'rules', got {type(data).__name__}")
        return cls(**text_keys(data))
