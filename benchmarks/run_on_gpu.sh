#!/usr/bin/env bash
# Issue 22's GPU checks as one prepared script, for a lent H100/H200 (tests and CI never need a GPU). It names the
# card, then runs, each on the GPU with the figures named by the card:
#   1. gpu_checks.py: QLoRA, 8-bit states and the bf16 baseline (ln 2 at step 0, peak max_memory_allocated);
#   2. bench_dpo.py: DPO against TRL's GPU defaults (bf16; and its fastest, precomputed reference without gradient
#      checkpointing) on a ≈0.78B Llama built from a config (24 layers × 1536, 32k vocabulary, random weights);
#   3. bench_online.py: GRPO and Online DPO against TRL (bf16 on both sides, vLLM off) on the same shape.
# Usage, from the repository root with the bench extra installed: bash benchmarks/run_on_gpu.sh [results folder]
# (about 9 minutes on an H100; each step prints as it ends, so a cut run still leaves its figures).
set -euo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: this script is for a GPU machine"
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 2**30:.1f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
shape="--layers 24 --hidden-size 1536 --vocab-size 32000"
python benchmarks/gpu_checks.py --out "$out/gpu-checks.json"
python benchmarks/bench_dpo.py $shape --workloads a --trl-configs default,bf16-no-gc+precompute \
    --preftune-configs default --no-ablations --steps 5 --max-idle-wait 0 --results-dir "$out"
python - "$out" <<'PY'
import json, pathlib, sys
latest = max(pathlib.Path(sys.argv[1]).glob("2*.json"), key=lambda p: p.stat().st_mtime)
for run in json.loads(latest.read_text())["runs"]:
    print(f"DPO {run['tool']} {run['config']} on {run.get('device')}: {run.get('pairs_per_s')} pairs/s, "
          f"max_memory_allocated {run.get('cuda_peak_gib')} GiB")
PY
python benchmarks/bench_online.py $shape --prompt-tokens 128 --completion-tokens 64 --group-size 8 --bf16 \
    --repeats 1 --steps 3 --results-dir "$out"
