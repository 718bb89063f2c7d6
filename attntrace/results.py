"""Persisting an observer's `result()` when it does not save itself, and reading it back.

Format (`<observer folder>/`):

- `result.json`: `{"format": "attntrace-result/1", "observer": <label>, "class": <module.Class>,
  "result": <data>}`. Plain data (numbers, strings, booleans, None, lists, mappings, dataclasses,
  pydantic models, pandas DataFrames as lists of row mappings) is written as JSON; a tensor or numpy
  array is replaced by `{"__tensor__": KEY}` (numpy arrays: `{"__tensor__": KEY, "numpy": true}`).
- `result.safetensors`: every tensor, under its `KEY` (its path in the result: `maps`, `0.q`, ...).
- Floats that JSON cannot hold (NaN, infinities) are written as the strings `"nan"`, `"inf"`, `"-inf"`;
  any other object is written as `{"__repr__": repr(obj)}` and listed in `result.json`'s `"lossy"`.

`read_result(folder)` rebuilds the value (tensors as CPU torch tensors, numpy arrays as numpy).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .core.errors import RunError

__all__ = ["RESULT_FORMAT", "is_empty", "read_result", "write_result"]

RESULT_FORMAT = "attntrace-result/1"
JSON_NAME = "result.json"
TENSORS_NAME = "result.safetensors"


def is_empty(value: Any) -> bool:
    """True when a result holds nothing: None, zero, empty containers, empty tensors, all the way down."""
    import torch

    if value is None or value is False:
        return True
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == 0
    if isinstance(value, (str, bytes)):
        return len(value) == 0
    if isinstance(value, torch.Tensor):
        return value.numel() == 0
    if isinstance(value, dict):
        return all(is_empty(v) for v in value.values())
    if isinstance(value, (list, tuple, set)):
        return all(is_empty(v) for v in value)
    size = getattr(value, "size", None)  # numpy arrays, DataFrames
    if isinstance(size, int):
        return size == 0
    return False


class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, Any] = {}
        self.lossy: list[str] = []

    def encode(self, value: Any, path: str) -> Any:
        import torch

        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            if math.isnan(value):
                return "nan"
            if math.isinf(value):
                return "inf" if value > 0 else "-inf"
            return value
        if isinstance(value, torch.Tensor):
            return self._tensor(value, path, numpy=False)
        if type(value).__module__ == "numpy":
            import numpy as np

            if isinstance(value, np.ndarray):
                return self._tensor(torch.from_numpy(np.ascontiguousarray(value)), path, numpy=True)
            if isinstance(value, np.generic):
                return self.encode(value.item(), path)
        if isinstance(value, dict):
            return {str(k): self.encode(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.encode(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value)]
        if isinstance(value, (set, frozenset)):
            return self.encode(sorted(value, key=repr), path)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return self.encode(dataclasses.asdict(value), path)
        if hasattr(value, "model_dump") and callable(value.model_dump):  # pydantic
            return self.encode(value.model_dump(mode="python"), path)
        if hasattr(value, "to_dict") and type(value).__name__ == "DataFrame":  # pandas
            return self.encode(value.to_dict(orient="records"), path)
        if isinstance(value, Path):
            return str(value)
        self.lossy.append(path or "(result)")
        return {"__repr__": repr(value)[:2000]}

    def _tensor(self, t: Any, path: str, numpy: bool) -> dict[str, Any]:
        key = path or "result"
        while key in self.tensors:
            key += "_"
        self.tensors[key] = t.detach().cpu().contiguous()
        return {"__tensor__": key, "numpy": True} if numpy else {"__tensor__": key}


def write_result(value: Any, directory: Path, *, label: str, observer_class: str) -> tuple[list[Path], list[str]]:
    """Write `value` as `result.json` (+ `result.safetensors` when it holds tensors).

    Returns the files written and the paths of values stored only as their repr (lossy).
    """
    enc = _Encoder()
    data = enc.encode(value, "")
    directory.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    if enc.tensors:
        from safetensors.torch import save_file

        tpath = directory / TENSORS_NAME
        save_file(enc.tensors, str(tpath))
        files.append(tpath)
    doc = {"format": RESULT_FORMAT, "observer": label, "class": observer_class, "result": data}
    if enc.lossy:
        doc["lossy"] = enc.lossy
    jpath = directory / JSON_NAME
    jpath.write_text(json.dumps(doc, indent=1, allow_nan=False), encoding="utf-8")
    files.append(jpath)
    return files, enc.lossy


def read_result(directory: str | Path) -> Any:
    """The value `write_result` wrote in `directory` (tensors loaded on the CPU)."""
    folder = Path(directory)
    jpath = folder / JSON_NAME
    try:
        doc = json.loads(jpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read the observer result {jpath}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != RESULT_FORMAT:
        raise RunError(f"{jpath} is not an attntrace result file (format {RESULT_FORMAT!r})")
    tensors: dict[str, Any] = {}
    tpath = folder / TENSORS_NAME
    if tpath.is_file():
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(tpath))
        except Exception as exc:  # a truncated or corrupt file: name it
            raise RunError(f"cannot read {tpath}: {type(exc).__name__}: {exc}") from None
    return _decode(doc.get("result"), tensors, tpath)


def _decode(value: Any, tensors: dict[str, Any], tpath: Path) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, tpath) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            key = value["__tensor__"]
            if key not in tensors:
                raise RunError(f"{tpath} lacks the tensor {key!r} that result.json refers to")
            t = tensors[key]
            return t.numpy() if value.get("numpy") else t
        return {k: _decode(v, tensors, tpath) for k, v in value.items()}
    return value
