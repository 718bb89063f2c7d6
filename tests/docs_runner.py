"""Running an experiment YAML of the docs as a user would: `attntrace validate`, `run` and `report`."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any


def run_experiment_yaml(text: str, out: Path) -> Any:
    """Validate and run `text` from the command line into `out`, then build its explorer page, with every
    Python warning but a library's deprecation an error. Returns the run read back, checked: no run warning,
    every item done, every rule's observer with results in every item."""
    from attntrace import load_run
    from attntrace.cli import main

    path = out.parent / f"{out.name}.yaml"
    path.write_text(text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Libraries' own API churn is not the run's (diffusers' EulerDiscreteScheduler.set_timesteps hands a
        # tensor to numpy 2's np.array: a DeprecationWarning about __array__'s copy keyword).
        warnings.filterwarnings("default", category=DeprecationWarning)
        warnings.filterwarnings("default", category=PendingDeprecationWarning)
        assert main(["validate", str(path)]) == 0
        assert main(["run", str(path), "--no-progress", "--set", f"output={out}"]) == 0
        assert main(["report", str(out)]) == 0
    assert (out / "index.html").stat().st_size > 0
    run = load_run(out)
    assert run.warnings == [], run.warnings  # every rule fired, every observer recorded something
    labels = {r.get("name") or r["use"] for r in run.manifest["config"]["trace"]["rules"]}
    for item in run:
        assert item.status == "done", item.record.get("error")
        assert labels <= set(item.observers), (labels, item.observers)
    return run
