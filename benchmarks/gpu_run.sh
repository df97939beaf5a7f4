#!/usr/bin/env bash
# Every GPU measurement still missing, in priority order, into one folder: raw logs, each
# harness's JSON, and benchmarks/results/gpu/summary.json merged with the earlier records.
#
#   benchmarks/gpu_run.sh OUT            # full size, CUDA: about 9 minutes on an H100/H200
#   benchmarks/gpu_run.sh --tiny OUT     # tiny models on a CPU (tests/test_benchmarks.py)
#
# Budget at full size (cogvideox-5b, 49 x 480 x 720; estimates from the committed H100 runs:
# about 30 s to build the random models, 1.9 s an eager step, 1.5 s a compiled one, 5 s a VAE
# decode, 140 s a whole-model compile; regional compile expected well under that):
#   1. step profile, 1 warm-up + 2 steps, op-class breakdown              ~1.0 min
#   2. uncompiled start, 5 steps                                          ~1.0 min
#   3. cold compiled start (regional compile + warm-up, cache saved), 5   ~2.5 min
#   4. warm compiled start (cache loaded), one full 50-step render        ~2.0 min
#   5. attention kernels and fused QKV, one step each, no compile         ~1.0 min
#   6. speed modes default and faster, 50 steps each after a 10-step warm-up ~2.5 min
#      (faster is the fastest mode; its 50-step render is the other full one)
# Each step is its own process; a failing step is logged and the rest still run. Steps 2-4
# each get an empty TORCHINDUCTOR_CACHE_DIR, as a new container has (at full size).
set -uo pipefail
cd "$(dirname "$0")/.."
size=full steps=5 full_steps=50 frames=() device=(--device cuda) python=${PYTHON:-python3}
if [ "${1:-}" = "--tiny" ]; then
  size=tiny steps=2 full_steps=2 frames=(--frames 9) device=(--device cpu); shift
fi
out=${1:?usage: benchmarks/gpu_run.sh [--tiny] OUT}
summary=${SUMMARY:-benchmarks/results/gpu/summary.json}
[ "$size" = tiny ] && summary=${SUMMARY:-$out/summary.json}  # CPU figures stay out of it
mkdir -p "$out"
failed=0
step() {  # name, then the command; its output goes to $out/<name>.log
  local name=$1; shift
  echo "== $name: $*" | tee -a "$out/run.log"
  local started=$SECONDS
  if PYTHONUNBUFFERED=1 "$@" >"$out/$name.log" 2>&1; then
    echo "== $name: done in $((SECONDS - started)) s" | tee -a "$out/run.log"
  else
    echo "== $name: FAILED after $((SECONDS - started)) s (see $name.log)" | tee -a "$out/run.log"
    failed=1
  fi
}
fresh_inductor() { rm -rf "$out/inductor-$1"; echo "$out/inductor-$1"; }
# At tiny size (on a CPU, in CI) the warm start reuses the cold start's inductor folder: from
# the compile cache alone a CPU still rebuilds its C++ kernels, a minute or more, and that the
# cache alone serves a fresh start is what tests/test_compile_cache.py shows.
inductor_for() {
  if [ "$size" = tiny ] && [ "$1" = warm ]; then echo "$out/inductor-cold"; else fresh_inductor "$1"; fi
}
common=(--variant cogvideox-5b --size "$size")

step profile "$python" benchmarks/step_profile.py "${common[@]}" "${device[@]}" "${frames[@]}" \
  --out "$out"
for start in uncompiled cold warm; do
  n=$steps; [ "$start" = warm ] && n=$full_steps
  step "compile-$start" env TORCHINDUCTOR_CACHE_DIR="$(inductor_for "$start")" \
    "$python" benchmarks/compile_setup.py "${common[@]}" --start "$start" --steps "$n" \
    "${frames[@]}" --out "$out"
done
step attention "$python" benchmarks/transformer_step.py "${common[@]}" "${device[@]}" \
  "${frames[@]}" --repeats 3 --no-compile --out "$out"
step speed-modes "$python" benchmarks/speed_modes.py "${common[@]}" --modes default,faster \
  --steps "$full_steps" "${frames[@]}" --out "$out"
step summary "$python" benchmarks/summary.py --summary "$summary" "$out" \
  benchmarks/results/gpu/*/
exit $failed
