#!/usr/bin/env bash
# Runs every benchmark of issue 7 and appends the tables to benchmarks/RESULTS.md.
# On the 2-core CPU box this takes about 30 minutes; nothing else should run meanwhile. W2 and W3-sd15
# run without a warm-up round (each round takes minutes); the median of 3 drops a slow first run.
set -euo pipefail
cd "$(dirname "$0")"
out=RESULTS.md
python bench.py --workload W1 --runs "${W1_RUNS:-7}" --out "$out"
python bench.py --workload W3 --runs "${W3_RUNS:-5}" --out "$out"
python bench.py --workload W3-sd15 --runs "${W3_SD15_RUNS:-3}" --warmup 0 --out "$out" --only \
  "attached, no rule" "shapes, all sites" "heatmap, cross" "reweight, cross" \
  "store everything: save probs fp16 head-mean cond-half, all sites" \
  "explicit-attention floor, cross" "copied processor: record cross maps"
python bench.py --workload W2 --runs "${W2_RUNS:-3}" --warmup 0 --out "$out"
python bench_compile.py --runs "${COMPILE_RUNS:-9}" --out "$out"
python bench_stats_memory.py
python bench_heatmap_memory.py
python bench_daam_masactrl.py --pipe tiny --runs "${RECIPES_RUNS:-3}" --threads 1 --out RESULTS_recipes.md
