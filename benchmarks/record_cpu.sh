#!/usr/bin/env bash
# Record the CPU result files of benchmarks/results/ (one json + md + png set per run), each run short.
# Usage: bash benchmarks/record_cpu.sh [DATE] [RUN ...]
#   (RUN: main kernels static ragged stage next qwen qwen-2b side side-llava; default all)
# Waits for a quiet minute first (1-minute load below 0.5): other work on the cores slows every method.
set -euo pipefail
D=${1:-$(date +%F)}; shift || true
RUNS=${*:-main kernels static ragged stage next qwen qwen-2b side side-llava}
R=benchmarks/results
while awk '{exit !($1 >= 0.5)}' /proc/loadavg; do sleep 10; done
record() {  # name, then the bench arguments
  local name=$1; shift
  python -m flowcut_kernels.bench "$@" --json "$R/$name-cpu-$D.json" --markdown "$R/$name-cpu-$D.md" \
    --plot "$R/$name-cpu-$D.png" --no-progress
}
for run in $RUNS; do
  case $run in
    main) record bench-clip-l-336 --device cpu ;;
    kernels) record kernels --preset kernels --device cpu ;;
    static) record static-clip-l-336 --preset clip-l-336 --device cpu --batch 1 4 --repeats 5 \
      --methods unpruned flowcut static compiled ;;
    ragged) record ragged-clip-l-336 --preset ragged-clip-l-336 --device cpu --repeats 4 ;;
    stage) record llava-tiny-stage --preset llava-tiny --device cpu ;;
    next) record llava-next-crops --preset llava-next-crops --device cpu --repeats 4 ;;
    qwen) record qwen2-vl-tower --preset qwen2-vl-tower --device cpu --repeats 4 ;;
    qwen-2b) record qwen2-vl-2b --preset qwen2-vl-2b-cpu --device cpu --repeats 4 ;;
    side) record side-clip-l-336 --preset clip-l-336 --device cpu --batch 1 4 --repeats 5 \
      --methods unpruned flowcut visionzip fastv downsample ;;
    side-llava) record side-llava-tiny --preset llava-tiny --device cpu --batch 1 4 \
      --methods unpruned flowcut visionzip fastv downsample stage ;;
  esac
done
