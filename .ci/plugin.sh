#!/usr/bin/env bash
# CI: install the example plugin as a separate distribution, run its tests, then a YAML trace that
# names its observer (found through the `attntrace.observers` entry point, not by import).
# Usage: .ci/plugin.sh   (from the repository root, in an environment where attntrace is installed)
# Set PLUGIN_TARGET=/some/dir to install into that directory (added to PYTHONPATH) instead of site-packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PLUGIN=./plugins/attntrace-plugin-example

if [[ -n "${PLUGIN_TARGET:-}" ]]; then
    pip install -q --no-deps --no-build-isolation --target "$PLUGIN_TARGET" "$PLUGIN"
    export PYTHONPATH="$PWD:$PLUGIN_TARGET${PYTHONPATH:+:$PYTHONPATH}"
else
    pip install -q --no-deps "$PLUGIN"
fi
rm -rf "$PLUGIN/build" "$PLUGIN"/src/*.egg-info

python -m pytest -q -p no:cacheprovider "$PLUGIN/tests"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cat > "$work/trace.yaml" <<'YAML'
rules:
  - use: head_importance
    match: "*attn2"
    kind: cross
    with: {metric: concentration}
  - use: attntrace-plugin-example:head_importance
    name: head_norms
    match: "up_blocks.*"
    kind: self
    with: {metric: output_norm}
YAML

python - "$work" <<'PY'
import json, sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from attntrace import TraceConfig, Tracer

work = Path(sys.argv[1])
torch.manual_seed(0)
unet = UNet2DConditionModel(
    block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    sample_size=16, norm_num_groups=8,
).eval()
inputs = {"sample": torch.randn(2, 4, 16, 16), "timestep": torch.tensor(10),
          "encoder_hidden_states": torch.randn(2, 7, 32)}
tracer = Tracer(TraceConfig.from_yaml(work / "trace.yaml"), output_dir=work / "run")
with tracer.attach(unet), torch.no_grad():
    for _ in range(2):
        unet(**inputs)
files = tracer.save()
scores = json.loads((work / "run" / "head_importance" / "head_importance.json").read_text())["scores"]
norms = json.loads((work / "run" / "head_norms" / "head_importance.json").read_text())["scores"]
assert scores and all(k.endswith("attn2") for k in scores), scores
assert norms and all(k.startswith("up_blocks") and k.endswith("attn1") for k in norms), norms
assert all(0.0 <= v <= 1.0 for vals in scores.values() for v in vals)
print(f"plugin trace ok: {len(files)} files, {len(scores)} cross sites, {len(norms)} self sites")
PY
