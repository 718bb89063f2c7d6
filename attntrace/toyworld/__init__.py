"""A toy world with ground truth, and a text-to-image model trained on it that ships with attntrace.

`world` renders scenes of coloured shapes with captions and per-object masks; `segment` finds the
named shapes in the named colours in any image; `model` loads the shipped pipelines, a
`StableDiffusionPipeline` (UNet, cross-attention) and a `StableDiffusion3Pipeline` (transformer, joint
attention); `train` and `train_joint` are the scripts that made them (`python -m attntrace.toyworld.train
--out DIR`, `python -m attntrace.toyworld.train_joint --out DIR`).
"""

from .model import call_kwargs, load_joint_pipeline, load_pipeline, random_joint_pipeline, random_pipeline
from .segment import Found, colour_masks, contains, find_objects
from .world import (
    COLOURS,
    SHAPES,
    VOCABULARY,
    Scene,
    SceneObject,
    ToyVocabularyError,
    check_prompt,
    parse_prompt,
    render_scene,
    sample_scene,
)

__all__ = [
    "COLOURS",
    "SHAPES",
    "VOCABULARY",
    "Found",
    "Scene",
    "SceneObject",
    "ToyVocabularyError",
    "call_kwargs",
    "check_prompt",
    "colour_masks",
    "contains",
    "find_objects",
    "load_joint_pipeline",
    "load_pipeline",
    "parse_prompt",
    "random_joint_pipeline",
    "random_pipeline",
    "render_scene",
    "sample_scene",
]
