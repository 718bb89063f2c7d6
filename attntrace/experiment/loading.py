"""Loading the experiment's model with the library's own `from_pretrained`: device, dtype, scheduler."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from ..core.errors import ConfigError, RunError
from .checks import resolve_model_path
from .spec import Experiment

__all__ = ["first_line", "load_model", "pick_device", "pick_dtype", "set_scheduler"]


def pick_device(spec: str, local_rank: int = 0) -> str:
    """Resolve `auto` to cuda (this process's local GPU under a launcher) or cpu."""
    import torch

    if spec == "auto":
        if torch.cuda.is_available():
            return f"cuda:{local_rank % torch.cuda.device_count()}"
        return "cpu"
    if spec == "cuda" and local_rank:
        return f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}"
    return spec


def pick_dtype(spec: str, device: str) -> Any:
    """Resolve `auto` to float16 on CUDA and float32 elsewhere; otherwise the named torch dtype."""
    import torch

    if spec == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, spec)


def load_model(exp: Experiment, device: str | None = None) -> tuple[Any, Any]:
    """Load `(model_or_pipeline, tokenizer_or_None)` with the library's own `from_pretrained`."""
    name = exp.model.pipeline
    device = device or pick_device(exp.model.device)
    dtype = pick_dtype(exp.model.dtype, device)
    path = resolve_model_path(exp.model.path)
    kwargs: dict[str, Any] = {}
    if exp.model.subfolder:
        kwargs["subfolder"] = exp.model.subfolder
    if exp.is_text_model:
        transformers = _library("transformers", "a transformers class")
        cls = _loader(transformers, name, "Auto class")
        try:
            model = cls.from_pretrained(path, dtype=dtype, **kwargs)
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as exc:
            raise RunError(f"cannot load {name} from {path}: {first_line(exc)}") from None
        return model.to(device).eval(), tokenizer
    cls = _loader(_library("diffusers", "a diffusers pipeline"), name, "pipeline class")
    try:
        with warnings.catch_warnings():  # diffusers 0.42 renamed torch_dtype; older releases need it
            warnings.simplefilter("ignore", FutureWarning)
            pipe = cls.from_pretrained(path, torch_dtype=dtype, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        raise RunError(f"cannot load {name} from {path}: {first_line(exc)}") from None
    return pipe.to(device), None


def _library(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RunError(f"model.pipeline names {what} but {module} is not installed") from None


def _loader(library: Any, name: str, what: str) -> Any:
    cls = getattr(library, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ConfigError(f"{library.__name__} has no {what} {name!r}", field="model.pipeline")
    return cls


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def set_scheduler(exp: Experiment, pipe: Any) -> None:
    """Swap in `inputs.scheduler`, built from the pipeline's own scheduler config (a no-op when unset)."""
    name = exp.inputs.scheduler
    if not name or exp.is_text_model:
        return
    import diffusers

    cls = getattr(diffusers, name)
    current = getattr(pipe, "scheduler", None)
    if current is None:
        raise ConfigError(f"{type(pipe).__name__} has no scheduler to replace", field="inputs.scheduler")
    if type(current) is not cls:
        pipe.scheduler = cls.from_config(current.config)
