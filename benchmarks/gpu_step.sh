#!/usr/bin/env bash
# The ViT-B/14 train step on one GPU: `python -m triplane3d.benchmark` for a few settings, each
# report as JSON under $OUT (default ./gpu_step_out). Run from the repository root on a machine
# with a CUDA jax; the project's own dependencies either installed or put on PYTHONPATH first.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_step.sh [STEPS]
#
# Settings, in the order they run (the first is the paper's step as configs/vitb.py sets it,
# per-device batch 64; each further one changes one thing): remat policy 'dots' (keep matmul
# outputs); no rematerialisation; batch 128. A setting that fails (out of memory, say) is
# reported and the next one runs.
set -u
OUT=${OUT:-gpu_step_out}
STEPS=${1:-20}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The configs import as triplane3d.configs, as an installed package lays them out.
[ -e triplane3d/configs ] || ln -sfn ../configs triplane3d/configs
[ -e triplane3d/launch ] || ln -sfn ../launch triplane3d/launch

python3 - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import jax, flax, optax, orbax.checkpoint as ocp
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__)
print('devices', jax.devices())
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee -a "$OUT/env.txt"

bench() {  # name, timeout in seconds, overrides...
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*"
  timeout "$limit" python3 -m triplane3d.benchmark --config=configs/vitb.py --steps="$STEPS" \
    --warmup=3 --json="$OUT/$name.json" "$@" 2>&1 | grep -v "^W\|^I" | tail -40
}

bench vitb_b64 180 --config.train.batch_size=64
bench vitb_b64_dots 110 --config.train.batch_size=64 --config.model.remat_policy=dots
bench vitb_b64_noremat 110 --config.train.batch_size=64 --config.model.remat=False
bench vitb_b128 110 --config.train.batch_size=128
ls -la "$OUT"
