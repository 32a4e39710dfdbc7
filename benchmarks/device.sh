#!/usr/bin/env bash
# The sampling benchmark table on a GPU or TPU machine, in one command (about 5-8 minutes):
#
#     benchmarks/device.sh                 # from the repository root, in an environment with jax[cuda] / jax[tpu]
#     PYTHON=.venv/bin/python BATCHES="1 8" benchmarks/device.sh
#
# Runs benchmarks/sampling.py on the shipped model: our sampler in bfloat16 (float, fake-quant W4A8, the QLIP
# schedule) at batch 1/8/32 with cold and warm compile times, diffusers' eager pipeline on the same latents
# (on cuda in bfloat16 when torch sees a GPU, else on the CPU), and the start-up of a second
# `qlip sample --precision qlip` process with the persistent compilation cache; then prints the table.
# The integer (--int8) and batch-invariant W4A8 rows run beside them.
# Everything is printed to the terminal and kept in benchmarks/device-<platform>-<date>.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
BATCHES=${BATCHES:-"1 8 32"}
STEPS=${STEPS:-25}
LIMIT=${LIMIT:-470}   # seconds: stop before 8 minutes whatever happens

platform=$(PYTHONPATH=$PWD "$PY" -c "import jax; print(jax.devices()[0].platform)")
kind=$(PYTHONPATH=$PWD "$PY" -c "import jax; d = jax.devices(); print(f'{len(d)} x {d[0].device_kind}')")
echo "device: $platform ($kind); python: $PY; $(uptime)"
if [ "$platform" = "cpu" ] && [ -z "${ALLOW_CPU:-}" ]; then
  echo "error: JAX sees no GPU or TPU (install jax[cuda12] or jax[tpu]); ALLOW_CPU=1 runs it on the CPU anyway" >&2
  exit 1
fi
out="benchmarks/device-$platform-$(date -u +%Y%m%dT%H%M).txt"
# shellcheck disable=SC2086
PYTHONPATH=$PWD timeout --signal=INT "$LIMIT" "$PY" benchmarks/sampling.py --dtype bfloat16 --steps "$STEPS" \
  --repeats 3 --batches $BATCHES "$@" 2>&1 | tee "$out"
echo "saved: $out"
