#!/usr/bin/env bash
# The ViT-B/14 train step on one GPU: `python -m triplane3d.benchmark --config=configs/vitb.py`
# in a few settings, one JSON report per setting under $OUT (default ./gpu_step_out). Run from
# the repository root on a machine with a CUDA jax and the project's dependencies importable
# (on a lent GPU machine: the wheels of benchmarks/gpu_wheels.sh, installed as its header says).
#
#   OUT=/tmp/gpu STEPS=10 LIMIT=180 PROFILE=1 bash benchmarks/gpu_step.sh [NAME:OVERRIDES ...]
#
# A setting is NAME:--config.x=y;--flag=v (';'-separated benchmark flags, as commas occur inside
# tuple values, on top of per-device batch 64; a later flag wins, so '--steps=3' shortens one
# setting). Without arguments, the paper step and the same step with a float32 point MLP:
#   default     the paper step as configs/vitb.py sets it, with the GPU defaults (render.gpu_chunk:
#               4 whole images per rematerialised render step; 'auto' taps fused in both
#               passes; render.sort 'auto', i.e. jax.lax.sort on GPUs; the point MLP in
#               bfloat16 since session 19): 0.488 s, 4.02 % MFU on an H100 (jax 0.11.2,
#               2026-11-27, session 12, then named mlp_bf16);
#   mlp_f32     the same with the point MLP in float32 (the default until session 19): 0.592 s,
#               3.31 % (session 12).
# Also: 'rank:--config.render.sort=rank' (the comparison merge, the default after session 12's
# GPU run until session 18: its compile did not end within 260 s on an H100 in session 18, 336 s
# compiled for one on a CPU against 93 s with the sort: give it LIMIT ≥ 450 alone),
# 'pallas:--config.render.lookup=pallas;--config.render.mlp_dtype=float32' and the same with
# ';--config.render.chunk=0;--config.render.gpu_chunk=0' as 'pallas_noremat' (the lookup and
# the point MLP in one float32 Pallas/Triton kernel, render/fused.py, with and without the
# render remat: the kernel alone was 4.6× slower than XLA's lookup + MLP on an H100 in session
# 18, LOOKUP=1 below; steps not timed),
# 'tpu_shaped:--config.render.gpu_chunk=0;--config.render.taps=loop;--steps=3',
# the step as GPUs ran it before (render.chunk=4096, taps in loops): ~368 000 kernels, 1.563 s.
# LOOKUP=1 first times the lookup + point MLP alone, 'xla' against 'pallas' at one GPU chunk's
# 4.2 M points (benchmarks/lookup_mlp.py; ~30 s of the 150 s it may take, lines in run.log).
# PROFILE=1 traces 2 more steps per setting (`--profile`): the JSON gets 'device_time' (busy
# time by model part, the top ops) and the trace comes back as $OUT/NAME.xplane.pb.
# Each setting compiles afresh: the reference took ~160 s on an H100 (jax 0.11.2): compile 75 s,
# 13 steps 22 s, the rest start-up and initialisation (53 s to the initialised state, batch
# and teacher in session 18; the teacher is now a copy, not a second initialisation: on this
# CPU's demo 15.7 → 10.5 s). The benchmark reports each phase on stderr as it ends (lines
# 'benchmark: ...', shown below), so a setting stopped at its LIMIT still says how far it got.
# LIMIT (seconds per setting) must stay above ~170, and the settings' LIMITs (and LOOKUP's 150
# s) together below the device's 600 s per command: the script refuses more than 580 s
# (BUDGET) rather than lose the last setting. A setting
# that fails or runs out of time is reported (all output goes to $OUT/run.log), and the next one
# runs. Everything lands in at most 2 + 2 × settings files (the device returns 8).
set -u
OUT=${OUT:-gpu_step_out}
STEPS=${STEPS:-10}
LIMIT=${LIMIT:-180}
PROFILE=${PROFILE:-0}
LOOKUP=${LOOKUP:-0}
BUDGET=${BUDGET:-580}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The configs import as triplane3d.configs, as an installed package lays them out.
[ -e triplane3d/configs ] || ln -sfn ../configs triplane3d/configs
[ -e triplane3d/launch ] || ln -sfn ../launch triplane3d/launch

settings=("$@")
[ ${#settings[@]} -gt 0 ] ||
  settings=('default:' 'mlp_f32:--config.render.mlp_dtype=float32')
if [ $((LOOKUP * 150 + ${#settings[@]} * LIMIT)) -gt "$BUDGET" ]; then
  echo "LOOKUP=$LOOKUP and ${#settings[@]} settings × LIMIT=$LIMIT s exceed BUDGET=$BUDGET s" \
    "(the device stops a command at 600 s): run fewer settings per call." && exit 2
fi

python3 - <<'EOF' 2>&1 | tee "$OUT/run.log"
import os
import triplane3d  # Sets XLA_FLAGS where this jax needs it (triplane3d/xla_gpu.py).
import jax, flax, optax
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__)
print('devices', jax.devices(), 'XLA_FLAGS', os.environ.get('XLA_FLAGS'))
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv |
  tee -a "$OUT/run.log"

if [ "$LOOKUP" = 1 ]; then
  echo "=== lookup_mlp ($(date +%T))" | tee -a "$OUT/run.log"
  timeout -k 10 150 python3 benchmarks/lookup_mlp.py --steps=20 2>&1 | tee -a "$OUT/run.log" |
    grep -E "^(xla|pallas_[0-9]+) |^[{]|Error|error:"
  echo "rc ${PIPESTATUS[0]} ($(date +%T))" | tee -a "$OUT/run.log"
fi

for setting in "${settings[@]}"; do
  case $setting in
  *:*) ;;
  *) echo "bad setting '$setting': want NAME:OVERRIDES (OVERRIDES may be empty)" && exit 2 ;;
  esac
  name=${setting%%:*}
  IFS=';' read -r -a overrides <<<"${setting#*:}"
  profile=()
  [ "$PROFILE" = 1 ] && profile=(--profile="$OUT/$name.prof")
  echo "=== $name: ${overrides[*]} ($(date +%T))" | tee -a "$OUT/run.log"
  timeout -k 15 "$LIMIT" python3 -m triplane3d.benchmark --config=configs/vitb.py --steps="$STEPS" \
    --warmup=3 --json="$OUT/$name.json" --config.train.batch_size=64 "${profile[@]}" \
    "${overrides[@]}" 2>&1 | tee -a "$OUT/run.log" |
    grep -E "^(compile_s|step_s_median|images_per_s |mfu|kernel_launches_per_step|memory_peak_bytes) |^(benchmark|profile): |Error|error:"
  echo "rc ${PIPESTATUS[0]} ($(date +%T))" | tee -a "$OUT/run.log"
  if [ "$PROFILE" = 1 ]; then  # The trace, flat (the device returns files 2 folders down).
    find "$OUT/$name.prof" -name '*.xplane.pb' -exec mv {} "$OUT/$name.xplane.pb" \; 2>/dev/null
    rm -rf "$OUT/$name.prof"
  fi
done
