#!/usr/bin/env bash
# The rollout benchmarks on an accelerator, in one command.
#
#   benchmarks/device.sh               # GPU/TPU: put the matching jax build in place, then run
#                                      # continuous vs static rollouts in bf16 on random
#                                      # Llama-3.2-1B- and Qwen3-1.7B-shaped models
#   benchmarks/device.sh --cpu-smoke   # the same script on the CPU with a 2M config (~1 min)
#
# PYTHON selects the interpreter (default: .venv/bin/python if present, else python3). The jax
# build is installed only when the interpreter's jax does not already run on the accelerator:
# jax[cuda12]/jax[cuda13] by the driver's CUDA version, jax[tpu] on a TPU host, pinned to the
# jax version already installed (the project pins jax < 0.11). Results go to
# benchmarks/results/device_<size>.json and the tables to benchmarks/results/device.md.
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) SMOKE=1 ;;
    -h|--help) sed -n 2,13p "$0"; exit 0 ;;
    *) echo "device.sh: unknown option $arg (use --cpu-smoke or nothing)" >&2; exit 2 ;;
  esac
done
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

backend() { "$PYTHON" -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo none; }

if [[ $SMOKE == 1 ]]; then
  export JAX_PLATFORMS=cpu
  want=cpu
  runs=("--size 2M --prompts 16 --slots 4,8 --prefill-batch 4 --refill-at 2 --max-new-tokens 32 --repeats 1 --dtype bfloat16 --out quick/device_2M")
  report=benchmarks/results/quick/device.md
else
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    want=gpu
    cuda=$(nvidia-smi | grep -o 'CUDA Version: [0-9]*' | grep -o '[0-9]*$' || echo 12)
    if [[ "$cuda" -ge 13 ]]; then extra=cuda13; else extra=cuda12; fi
  elif ls /dev/accel* >/dev/null 2>&1 || ls /dev/vfio/* >/dev/null 2>&1; then
    want=tpu
    extra=tpu
  else
    echo "device.sh: no NVIDIA GPU (nvidia-smi) or TPU (/dev/accel*) found; on a CPU run --cpu-smoke" >&2
    exit 2
  fi
  if [[ "$(backend)" != "$want" ]]; then
    version=$("$PYTHON" -c 'import jax; print(jax.__version__)' 2>/dev/null || echo "")
    spec="jax[$extra]${version:+==$version}"
    echo "device.sh: jax runs on $(backend), installing $spec" >&2
    "$PYTHON" -m pip install -q -U "$spec"
  fi
  if ! "$PYTHON" -c 'import jaxrlhf' 2>/dev/null; then
    "$PYTHON" -m pip install -q -e .
  fi
  runs=(
    "--size llama-1B --prompts 256 --slots 64,128 --prefill-batch 8 --refill-at 8 --dtype bfloat16 --repeats 3 --out device_llama-1B"
    "--size qwen3-1.7B --prompts 256 --slots 64,128 --prefill-batch 8 --refill-at 8 --dtype bfloat16 --repeats 3 --out device_qwen3-1.7B"
  )
  report=benchmarks/results/device.md
fi

got=$(backend)
if [[ "$got" != "$want" ]]; then
  echo "device.sh: jax runs on '$got', expected '$want'" >&2
  exit 3
fi
mkdir -p "$(dirname "$report")"
{
  echo "# Rollout benchmarks on $("$PYTHON" -c 'import jax; print(jax.devices()[0].device_kind)') ($(date -u +%F))"
  echo
} > "$report"
for r in "${runs[@]}"; do
  echo "device.sh: python benchmarks/continuous.py $r" >&2
  # shellcheck disable=SC2086  # the options are meant to split
  "$PYTHON" benchmarks/continuous.py $r | tee -a "$report"
  echo >> "$report"
done
echo "device.sh: tables in $report" >&2
