#!/usr/bin/env bash
# Every GPU measurement still missing, in priority order, into one folder: raw logs, each
# harness's JSON, and summary.json (the committed records merged with the new ones).
#
#   benchmarks/gpu_run.sh OUT                          # full size, CUDA: 9 minutes at most
#   benchmarks/gpu_run.sh --archive FILE.tar.gz OUT    # the same, OUT packed into FILE too
#                                                      # (outside OUT): one file to carry away,
#                                                      # packed again after every step
#   benchmarks/gpu_run.sh --tiny OUT                   # tiny models on a CPU (tests)
#
# WHEELS=DIR installs DIR's wheels first, into a scratch folder put first on PYTHONPATH (a GPU
# machine without internet access: benchmarks/download_wheels.sh fills DIR). BUDGET_S (540 at
# full size) bounds the whole run: a step gets the time left minus what the summary needs, and
# one that cannot start with enough is skipped, so the summary and archive are always written.
#
# Budget at full size (cogvideox-5b, 49 x 480 x 720; estimates from the committed H100 runs:
# 1.9 s an eager step, 1.5 s a compiled one, 5 s a VAE decode, seconds to build the random
# models, about 15 s to start a process). The steps come in the order of what they answer;
# what does not fit the budget is the end of the list:
#   1. step profile, eager: 1 warm-up + 2 steps, op-class breakdown      ~0.5 min
#   2. speed modes faster and default, 50 steps each after 4 warm-up     ~3.5 min
#      steps: the two full renders, and faster's fidelity against default;
#      written after each render, faster's first (default's eager time is
#      already measured end to end)
#   3. cold compiled start: regional compile of the blocks and of their  ~3 min (unknown:
#      parts, a warm-up of 5 renders (2 default, 1 at guidance 1, 2       22 graphs to
#      faster), compile cache saved; then 5 steps, then 2 compiled        compile; stopped
#      steps profiled (the compiled profile, even if the warm start       at 4.5 min)
#      does not fit)
#   4. warm compiled start (cache loaded, fresh inductor folder), 5       ~1.5 min
#      steps
#   5. attention kernels and fused QKV, 4-5 steps each, no compile       ~1.0 min
#      (measured on an H100 already: last)
# 4 and 5 rarely fit in one call of 9 minutes: a second call with the same OUT and SCRATCH and
# ONLY="compile-warm attention" runs them (SCRATCH holds the cold start's compile cache).
# Each step is its own process; a failing step is logged and the rest still run. ONLY="NAME..."
# runs those steps alone (profile, speed-modes, compile-cold, compile-warm, attention; the
# summary always runs). The compiled starts get empty TORCHINDUCTOR_CACHE_DIRs, as a new
# container has, outside OUT (thousands of files), in SCRATCH (a new temporary folder, removed
# at the end, unless given); TRITON_CACHE_DIR is unset, so Triton's kernels go there too and
# the warm start finds none the cold one left elsewhere.
set -uo pipefail
cd "$(dirname "$0")/.."
size=full steps=5 full_steps=50 warm_up_steps=4 frames=() device=(--device cuda) renders=()
cold_cap=${COLD_CAP_S:-270}  # a cold start that compiles for longer is itself the finding
budget=${BUDGET_S:-540} archive="" python=${PYTHON:-python3}
while [ $# -gt 1 ]; do
  case $1 in
    --tiny) size=tiny steps=2 full_steps=2 warm_up_steps=1 frames=(--frames 9)
            renders=(--warm-up-renders 1)
            device=(--device cpu) budget=${BUDGET_S:-1100}
            cold_cap=${COLD_CAP_S:-}; shift ;;
    --archive) archive=$2; shift 2 ;;
    *) break ;;
  esac
done
out=${1:?usage: benchmarks/gpu_run.sh [--tiny] [--archive FILE.tar.gz] OUT}
summary=${SUMMARY:-$out/summary.json}
if [ -n "${SCRATCH:-}" ]; then
  scratch=$SCRATCH
else
  scratch=$(mktemp -d) && trap 'rm -rf "$scratch"' EXIT
fi
mkdir -p "$out" "$scratch"
reserve=30  # seconds kept for the summary and the archive
failed=0

# Wheels that do not install leave every step skipped, and the reason in the archive.
if [ -n "${WHEELS:-}" ]; then
  if "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$scratch/site" "$WHEELS"/*.whl >"$out/wheels.log" 2>&1; then
    export PYTHONPATH="$scratch/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "== wheels: FAILED to install $WHEELS (see wheels.log)" | tee -a "$out/run.log"
    budget=0 failed=1
  fi
fi
# The committed records first, so that OUT/summary.json is the whole table to commit back.
[ -e "$summary" ] || cp benchmarks/results/gpu/summary.json "$summary"

step() {  # name, then the command; its output goes to $out/<name>.log
  local name=$1; shift
  if [ -n "${ONLY:-}" ] && [ "$name" != summary ] && [[ " $ONLY " != *" $name "* ]]; then
    echo "== $name: not in ONLY" | tee -a "$out/run.log"; return
  fi
  local left=$((budget - reserve - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "== $name: SKIPPED, ${left} s of the budget left" | tee -a "$out/run.log"
    failed=1; return
  fi
  # A warm start without the cold start's cache would compile everything again and be
  # recorded as warm: after a cold start stopped in its warm-up, it is skipped instead. Only
  # a whole cache counts: one stopped while saving leaves just its temporary *.tmp file.
  if [ "$name" = compile-warm ] && ! compgen -G "$scratch/weights/compile-cache/*.bin" >/dev/null; then
    echo "== $name: SKIPPED, no compile cache from a cold start in $scratch" | tee -a "$out/run.log"
    failed=1; return
  fi
  # A step with a cap of its own (STEP_CAP=seconds) leaves the rest to the steps after it.
  if [ -n "${STEP_CAP:-}" ] && [ "$left" -gt "$STEP_CAP" ]; then left=$STEP_CAP; fi
  if [ -n "${FRESH:-}" ]; then rm -rf "$FRESH"; fi
  echo "== $name: $*" | tee -a "$out/run.log"
  local started=$SECONDS
  if PYTHONUNBUFFERED=1 timeout --kill-after=10 "$left" "$@" >"$out/$name.log" 2>&1; then
    echo "== $name: done in $((SECONDS - started)) s" | tee -a "$out/run.log"
  else
    echo "== $name: FAILED after $((SECONDS - started)) s (see $name.log)" | tee -a "$out/run.log"
    failed=1
  fi
  pack
}
# The archive is written again after every step: a command stopped from outside (its own time
# limit shorter than BUDGET_S) still leaves the steps it finished in it.
pack() {
  if [ -n "$archive" ]; then
    tar -czf "$archive.part" -C "$out" . && mv -f "$archive.part" "$archive"
  fi
}
# At tiny size (on a CPU, in CI) the warm start reuses the cold start's inductor folder: from
# the compile cache alone a CPU still rebuilds its C++ kernels, a minute or more, and that the
# cache alone serves a fresh start is what tests/test_compile_cache.py shows. For the same
# reason the tiny starts keep the warm-up's first render only, and their request has its
# frame count (the default): the whole warm-up is tested with dynamo's graphs in
# tests/test_pipeline.py, its dynamic shapes through the cache in tests/test_compile_cache.py.
# The folder is emptied by step() (FRESH) when the start runs, not where its command line is
# expanded: a start skipped (ONLY, the budget) must not empty a folder a later one reuses.
inductor_for() {
  if [ "$size" = tiny ] && [ "$1" = warm ]; then echo "$scratch/inductor-cold"; else echo "$scratch/inductor-$1"; fi
}
fresh_for() {  # the folder a start empties first: all but tiny's warm start, which reuses cold's
  if [ "$size" = tiny ] && [ "$1" = warm ]; then echo ""; else inductor_for "$1"; fi
}
common=(--variant cogvideox-5b --size "$size")

step profile "$python" benchmarks/step_profile.py "${common[@]}" "${device[@]}" "${frames[@]}" \
  --out "$out"
step speed-modes "$python" benchmarks/speed_modes.py "${common[@]}" --modes faster,default \
  --steps "$full_steps" --warm-up-steps "$warm_up_steps" "${frames[@]}" --out "$out"
STEP_CAP=$cold_cap FRESH=$(fresh_for cold) step compile-cold \
  env -u TRITON_CACHE_DIR TORCHINDUCTOR_CACHE_DIR="$(inductor_for cold)" \
  "$python" benchmarks/compile_setup.py "${common[@]}" --start cold --steps "$steps" \
  "${renders[@]}" --weights "$scratch/weights" --profile-steps 2 --out "$out"
FRESH=$(fresh_for warm) step compile-warm \
  env -u TRITON_CACHE_DIR TORCHINDUCTOR_CACHE_DIR="$(inductor_for warm)" \
  "$python" benchmarks/compile_setup.py "${common[@]}" --start warm --steps "$steps" \
  "${renders[@]}" --weights "$scratch/weights" --out "$out"
step attention "$python" benchmarks/transformer_step.py "${common[@]}" "${device[@]}" \
  "${frames[@]}" --repeats 3 --no-compile --out "$out"
budget=$((SECONDS + reserve)) reserve=0  # the summary always runs, in the time kept for it
step summary "$python" benchmarks/summary.py --summary "$summary" "$out"
if [ -n "$archive" ]; then
  echo "== archive: $archive" | tee -a "$out/run.log" && pack
fi
exit $failed
