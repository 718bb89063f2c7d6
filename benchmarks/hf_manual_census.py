"""Census of hand-written attention in the installed transformers: which model families compute a
softmax inline (the `transformers-manual` adapter's sites), which are refused and why.

Imports every `transformers.models.<family>.modeling_<family>` module (no model is built) and applies the
adapter's own class rule (`classify`) plus the name/head-count rule `find_sites` uses. Run:
`python benchmarks/hf_manual_census.py > benchmarks/hf_manual_census.md`.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import warnings
from collections import defaultdict

import torch
import transformers

from attntrace.adapters.detect import forward_mentions
from attntrace.adapters.hf_manual import classify

warnings.filterwarnings("ignore")
root = os.path.join(os.path.dirname(transformers.__file__), "models")
manual: dict[str, list[str]] = defaultdict(list)
refused: dict[str, list[tuple[str, str]]] = defaultdict(list)
registry: set[str] = set()
failed: list[str] = []
families = 0
for fam in sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))):
    files = [f[:-3] for f in os.listdir(os.path.join(root, fam)) if re.fullmatch(r"modeling_\w+\.py", f)]
    if not files:
        continue
    families += 1
    for mod_name in files:
        try:
            mod = importlib.import_module(f"transformers.models.{fam}.{mod_name}")
        except Exception:
            failed.append(f"{fam}.{mod_name}")
            continue
        for cls_name, cls in vars(mod).items():
            if not (inspect.isclass(cls) and issubclass(cls, torch.nn.Module) and cls.__module__ == mod.__name__):
                continue
            if cls.forward is not torch.nn.Module.forward and forward_mentions(cls, "ALL_ATTENTION_FUNCTIONS"):
                registry.add(fam)
                continue
            ok, note = classify(cls)
            if not ok or "att" not in cls_name.lower():
                continue
            if note:
                refused[fam].append((cls_name, note.split(":")[0]))
            else:
                manual[fam].append(cls_name)

fams = sorted(set(manual) | set(refused))
only = [f for f in fams if f not in registry]
part = [f for f in fams if f in registry]
print(f"# Hand-written attention in transformers {transformers.__version__}\n")
print(f"{families} model families with modeling files; {len(registry)} use the attention registry somewhere.")
print(f"{len(fams)} families have attention classes with an inline softmax (or logsumexp):")
print(f"{len(only)} only hand-written, {len(part)} mixed with registry attention.")
print(f"Traceable by `transformers-manual`: {sum(1 for f in fams if manual[f])} families "
      f"({sum(len(v) for v in manual.values())} classes); refused classes: {sum(len(v) for v in refused.values())} "
      f"in {len(refused)} families.\n")
print("| family | registry too | traced classes | refused classes (why) |\n|---|---|---|---|")
for f in fams:
    r = "; ".join(f"{c} ({why})" for c, why in refused[f])
    print(f"| {f} | {'yes' if f in registry else ''} | {', '.join(manual[f])} | {r} |")
if failed:
    print(f"\nNot importable here ({len(failed)}): {', '.join(failed)}")
