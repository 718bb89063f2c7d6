"""Experiments: one YAML file (model, inputs, trace, output) and the runner that executes it."""

from __future__ import annotations

from .spec import Experiment, InputsSpec, ModelSpec, apply_overrides, experiment_schema, load_experiment

__all__ = ["Experiment", "InputsSpec", "ModelSpec", "apply_overrides", "experiment_schema", "load_experiment"]
