#!/usr/bin/env bash
# The wheels a lent GPU machine lacks to run benchmarks/gpu_step.sh, downloaded into .whl/
# (ignored by git) for its Python 3.12 on x86-64. That machine reaches no package index; its
# image already holds jax 0.11.2 with the CUDA 13 plugin, flax, optax, orbax-checkpoint,
# tensorstore, absl-py, etils, tqdm, pillow (the device tool's KINDS.md lists them). What
# `import triplane3d.benchmark, triplane3d.train` loads beyond that is below, at the versions
# this project's CI installs; `--no-deps`, so each one's own needs are named here too.
#
#   bash benchmarks/gpu_wheels.sh      # here, once (needs the package index)
#
# Then a device call carries `.whl` and starts with (as the device tool's README says):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit;
#   LOOKUP=1 PROFILE=1 bash benchmarks/gpu_step.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(
  ml_collections==1.1.0 grain==0.2.18 array_record==0.8.6 tensorflow-datasets==4.9.10
  tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 immutabledict==4.3.1
  portpicker==1.6.0 promise==2.3 toml==0.10.2 dm-tree==0.1.10
  # Imported lazily by tensorflow-datasets (so not seen by the import above); session 12 ran
  # the benchmark there with them.
  simple_parsing==0.1.9 docstring_parser==0.18.0 termcolor==3.3.0
)
platforms=()
for n in 28 27 24 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
mkdir -p .whl
for pkg in "${PKGS[@]}"; do
  # One at a time: pure-Python packages come as py3-none-any wheels, or only as sdists (promise
  # 2.3), which are built into a wheel here instead.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl "$pkg" ||
    python3 -m pip wheel -q --no-deps -w .whl "$pkg"
done
ls -la .whl
du -sh .whl
