#!/usr/bin/env bash
# On a GPU machine: CUDA kernel tests (real Triton, no interpreter), benchmarks, the CUDA
# extension, the end-to-end MFU and a profile. Everything is written under $WORK; after the device
# probe, each step and each e2e variant, the files in $OUT are refreshed (each one written under a
# temp name in $OUT and renamed, so a kill mid-copy never leaves a cut-off file in place of a good
# one), so a call killed at the device's limit (SIGKILL, no trap runs) still returns what finished.
# $OUT holds at most 8 files: the lent machines return at most 8 files of <= 16 MiB each.
#
#   OUT=/some/dir bash benchmarks/gpu_suite.sh
#   STEPS="kernels bench" BUDGET=550 bash benchmarks/gpu_suite.sh   # a subset; a device call stops at 10 min
#
# Steps, in order (measured times per step on an H100: BENCHMARKS.md):
#   kernels  CUDA variants of tests/kernels
#   bench    every benchmark file but the e2e, LoRA (the ext step's) and CPU-only transforms ones,
#            CUDA rows only (bench-pytest) + summary; the anchor-gather host probe; anchor_kl knob sweep;
#            knn_subgraph_kl forward and backward apart, with its knob sweep (bench-knn)
#   ext      build segpcl_fast._C with CUDA, its GPU tests, benchmark and per-part timing
#   e2e      end-to-end training step (ViT-B/16), one pytest per variant, images/s + MFU: the
#            E2E_VARIANTS (default compiled_fused cudagraphs_fused compiled_reference eager_fused) here; the
#            E2E_EXTRA ones (default bf16text_fused bf16text_cudagraphs compiled_triton, then compiled_cpp_lora
#            eager_reference, measured before, then autotune_fused autotune_cudagraphs, the presets' mode,
#            whose autotuning compiles for minutes, then staticbatch_fused, the static-batch graph beside
#            compiled_fused's symbolic one, then percallcast_fused, frozen weights cast every forward,
#            eagerloss_fused, the loss terms eager, cppwrapper_fused, inductor's C++ wrapper,
#            unbatchedmerge_fused, one addmm a LoRA merge, tf32_fused / tf32_cudagraphs, run.tf32, and
#            fp16_fused, run.precision=fp16 with its loss scaler)
#            after the profile step, as budget allows
#   profile  the compiled e2e step in steady state (kernel categories), then 5 steps of task 2
#            with ViT-B/16 (random weights, eager) through `segpcl-fast profile`
# STEPS unset runs all five; STEPS="" (set but empty) is refused. An entry STEP-PART runs that part
# of a step alone, as skipped.txt names them (e2e-eager_reference, bench-tune, profile-vitb16, ...).
# e2e and profile need open_clip (bring it: benchmarks/device_wheels.sh); without it they are skipped.
#
# Time (all in whole seconds; environment variables):
#   STEP_TIMEOUT (420)  each step command is sent SIGINT after this (pytest then ends its session and
#                       pytest-benchmark still writes its JSON), SIGKILL KILL_GRACE (20) s later.
#   BUDGET (0: none)    bounds the whole script: it returns within BUDGET s (+ about 2 s) whatever
#                       its children do. RESERVE (45 when BUDGET > 0) of it is held back for the final
#                       pack (`segpcl-fast env`, the last refresh of $OUT); every command before gets at
#                       most what is left of the rest less its kill grace, and is not started when
#                       that is under MIN_CMD_S (5). RESERVE must also cover the last refresh of
#                       $OUT (a tar of the logs: seconds). A step that would start with under
#                       MIN_STEP_S (60) s left (the profile step: MIN_PROFILE_S, 120: its first
#                       command compiles ViT-B/16), or an e2e variant with under MIN_COMPILED_VARIANT_S
#                       (120; eager_* variants: MIN_VARIANT_S, 45), is skipped. The knob sweeps (bench-tune, bench-knn) each stop after TUNE_TIMEOUT (120).
#   KERNEL_WORKERS (8)  pytest-xdist workers for the kernels step where xdist imports (the device image
#                       has it): its tests each compile Triton kernels, a CPU-bound wait (140 tests took
#                       117 s in one process on the H200, 2026-12-04); 1 runs them in one process.
#                       Summary scripts, probes and `segpcl-fast env` have timeouts too.
#   skipped.txt (reset by each call) names what this call skipped for lack of budget, one a line: a
#   step, e2e-VARIANT, or STEP-PART for a command of a started step (e.g. bench-tune), so a second
#   call with STEPS= set to those steps finishes the set.
# Exit status non-zero when any command failed or ran out of time, or a chosen step needs open_clip and it is
# not importable (all chosen steps still run); 2, with no step run, where torch sees no CUDA device.
#
# $OUT receives: device.txt (the probe; after the final pack it ends with `segpcl-fast env`),
# summary.md (this call's commands with exit status and seconds, what it skipped, then the kernel,
# knob, LoRA-part and e2e tables and the profile's categories), skipped.txt, results.tgz (all of
# $WORK: every log and JSON, profile_e2e_step/trace.json.gz included, the eager ViT trace
# profile_vitb16/trace.json not; when that is over 16 MiB it is rebuilt without any trace, as
# notes.txt in it says) and trace.json.gz (that eager trace gzipped, when under 16 MiB).
# $WORK is not emptied between calls: results.tgz and summary.md also carry what an earlier call on
# the same machine left there.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the scripts run as files import segpcl_fast from here
export PYTHONUNBUFFERED=1  # a script killed at its limit keeps the rows it printed
OUT="${OUT:-$PWD/gpu_results}"
WORK="${WORK:-/tmp/segpcl_gpu_work}"
PYTHON="${PYTHON:-python3}"
ALL_STEPS="kernels bench ext e2e profile"
if [ "${STEPS+set}" = set ] && [ -z "${STEPS//[[:space:]]/}" ]; then
  echo "gpu_suite.sh: STEPS is set but empty: name the steps to run (from: $ALL_STEPS), or unset STEPS to run all five" >&2
  exit 2
fi
STEPS="${STEPS:-$ALL_STEPS}"
E2E_VARIANTS="${E2E_VARIANTS-compiled_fused cudagraphs_fused compiled_reference eager_fused}"
E2E_EXTRA="${E2E_EXTRA-bf16text_fused bf16text_cudagraphs compiled_triton compiled_cpp_lora eager_reference autotune_fused autotune_cudagraphs staticbatch_fused percallcast_fused eagerloss_fused cppwrapper_fused unbatchedmerge_fused tf32_fused tf32_cudagraphs fp16_fused}"
# a step, or one part of it alone (the labels skipped.txt and summary.md use)
PARTS="bench-pytest bench-summary bench-host bench-tune bench-knn ext-build ext-tests ext-bench ext-parts e2e-summary profile-e2e_step profile-vitb16"
for v in $E2E_VARIANTS $E2E_EXTRA; do PARTS="$PARTS e2e-$v"; done
for entry in $STEPS; do
  case " $ALL_STEPS $PARTS " in *" $entry "*) ;; *)
    echo "unknown step '$entry' in STEPS; choose from: $ALL_STEPS, or one part: $PARTS" >&2; exit 2;; esac
done
BUDGET="${BUDGET:-0}"  # 0: no overall bound
STEP_TIMEOUT="${STEP_TIMEOUT:-420}"
KILL_GRACE="${KILL_GRACE:-20}"
MIN_STEP_S="${MIN_STEP_S:-60}"
MIN_VARIANT_S="${MIN_VARIANT_S:-45}"
# a compiled variant builds and compiles ViT-B/16 before its first round: 79-177 s on the H200 (session 35),
# so one started with less only spends the budget (session 38's review)
MIN_COMPILED_VARIANT_S="${MIN_COMPILED_VARIANT_S:-120}"
MIN_PROFILE_S="${MIN_PROFILE_S:-120}"
TUNE_TIMEOUT="${TUNE_TIMEOUT:-120}"
KERNEL_WORKERS="${KERNEL_WORKERS:-8}"
MIN_CMD_S="${MIN_CMD_S:-5}"
if [ -z "${RESERVE:-}" ]; then case "$BUDGET" in 0|'') RESERVE=0;; *) RESERVE=45;; esac; fi
for var in BUDGET RESERVE STEP_TIMEOUT KILL_GRACE MIN_STEP_S MIN_VARIANT_S MIN_COMPILED_VARIANT_S MIN_PROFILE_S TUNE_TIMEOUT MIN_CMD_S; do
  case "${!var}" in ''|*[!0-9]*) echo "gpu_suite.sh: $var must be a whole number of seconds, not '${!var}'" >&2; exit 2;; esac
done
case "$KERNEL_WORKERS" in ''|*[!0-9]*|0)
  echo "gpu_suite.sh: KERNEL_WORKERS must be a whole number of processes >= 1 (1: no xdist), not '$KERNEL_WORKERS'" >&2
  exit 2;; esac
for var in STEP_TIMEOUT KILL_GRACE TUNE_TIMEOUT MIN_CMD_S; do  # timeout treats 0 as "no limit"
  [ "${!var}" -ge 1 ] || { echo "gpu_suite.sh: $var must be at least 1" >&2; exit 2; }
done
QUICK_GRACE=$(( KILL_GRACE < 5 ? KILL_GRACE : 5 ))  # kill grace of the quick commands (summaries, env)
START=$SECONDS
# seconds left for the steps / for everything; SECONDS counts whole seconds, so +1 rounds elapsed up
left() { if [ "$BUDGET" -gt 0 ]; then echo $((BUDGET - RESERVE - (SECONDS - START + 1))); else echo 999999; fi; }
left_all() { if [ "$BUDGET" -gt 0 ]; then echo $((BUDGET - (SECONDS - START + 1))); else echo 999999; fi; }
POOL=left  # the budget the commands draw on: left during the steps, left_all in the final pack

mkdir -p "$OUT" "$WORK" || exit 2
STAGE="${WORK%/}.stage"  # where the files for $OUT are built (not inside $WORK, which tar reads)
mkdir -p "$STAGE" || exit 2
: > "$WORK/skipped.txt"  # this call's, not an earlier call's on the same machine
: > "$WORK/steps.txt"
rm -f "$OUT"/.*.tmp
status=0

want() {  # want STEP: the step, or a part of it, is chosen
  case " $STEPS " in *" $1 "*|*" $1-"*) return 0;; *) return 1;; esac
}
part() {  # part LABEL (STEP-PART): chosen, as its whole step or by itself
  case " $STEPS " in *" ${1%%-*} "*|*" $1 "*) return 0;; *) return 1;; esac
}

bounded() {  # bounded LABEL SIG GRACE LIMIT CMD...: CMD for at most LIMIT s and what $POOL has left less GRACE, then SIG, SIGKILL GRACE s later
  local label=$1 sig=$2 grace=$3 t=$4 l rc t0
  shift 4
  if [ "$BUDGET" -gt 0 ]; then
    l=$($POOL); l=$((l - grace))
    [ "$l" -lt "$t" ] && t=$l
  fi
  if [ "$t" -lt "$MIN_CMD_S" ]; then
    echo "gpu_suite.sh: ${label:-${*:1:4}} not started: ${t} s left for it (BUDGET=$BUDGET, MIN_CMD_S=$MIN_CMD_S)" >&2
    if [ -n "$label" ]; then echo "$label" >> "$WORK/skipped.txt"; echo "$label: not started (budget spent)" >> "$WORK/steps.txt"; fi
    return 125
  fi
  t0=$SECONDS
  # (fd 3: the command's stderr; bash's own "Killed" notice when timeout SIGKILLs goes to /dev/null)
  { timeout -s "$sig" -k "$grace" "$t" "$@" 2>&3 3>&-; } 3>&2 2>/dev/null
  rc=$?
  if [ -n "$label" ]; then
    case $rc in 124|137) echo "$label: stopped at its limit of $t s (exit $rc)";; *) echo "$label: exit $rc after $((SECONDS - t0)) s (limit $t s)";; esac >> "$WORK/steps.txt"
  fi
  return $rc
}
run_step() {  # run_step LABEL CMD...: a step command; SIGINT, so pytest ends cleanly and pytest-benchmark writes its JSON
  local label=$1; shift
  bounded "$label" INT "$KILL_GRACE" "$STEP_TIMEOUT" "$@"
}
quick() {  # quick LABEL LIMIT CMD...: a short command (summary script, probe)
  local label=$1 limit=$2; shift 2
  bounded "$label" TERM "$QUICK_GRACE" "$limit" "$@"
}
starts() {  # starts STEP [MIN_S]: chosen and enough budget left (MIN_S, default MIN_STEP_S) to be worth starting
  local min=${2:-$MIN_STEP_S}
  want "$1" || return 1
  if [ -n "${NEEDS_OPEN_CLIP:-}" ] && [ "${HAVE_OPEN_CLIP:-1}" != 1 ] && case " $NEEDS_OPEN_CLIP " in *" $1 "*) true;; *) false;; esac; then
    # a failure (status 1): a call that chose this step and ran nothing of it must not look like a success
    echo "step $1 skipped: open_clip is not importable here (benchmarks/device_wheels.sh)" | tee -a "$WORK/steps.txt" >&2
    status=1; return 1
  fi
  if [ "$(left)" -lt "$min" ]; then
    echo "$1" >> "$WORK/skipped.txt"; echo "step $1 skipped: $(left) s of budget left (needs $min)" >&2; return 1
  fi
  if [ "$BUDGET" -gt 0 ]; then echo "== step $1 ($(left) s of budget left) ==" >&2; else echo "== step $1 ==" >&2; fi
}

put() {  # put SRC NAME: $OUT/NAME replaced by one rename (a kill mid-copy leaves .NAME.tmp beside the old file)
  cp "$1" "$OUT/.$2.tmp" && mv -f "$OUT/.$2.tmp" "$OUT/$2"
}
fast() {  # fast CMD...: a command of save (tar, cp): what is left, at least 3 s, at most 120 s
  local t; t=$(left_all); t=$(( t < 3 ? 3 : (t > 120 ? 120 : t) ))
  timeout -k 1 "$t" "$@"
}
note() {  # note TEXT: into notes.txt (packed in results.tgz) once
  grep -qxF "$1" "$WORK/notes.txt" 2>/dev/null || echo "$1" | tee -a "$WORK/notes.txt" >&2
}
save() {  # refresh $OUT from $WORK: quick, nothing slow like `segpcl-fast env` here
  local max=$((16 * 1024 * 1024)) rc f
  {
    echo "# gpu_suite.sh: this call (steps: $STEPS; $(date -u +%Y-%m-%dT%H:%MZ))"
    echo
    if [ -s "$WORK/steps.txt" ]; then sed 's/^/- /' "$WORK/steps.txt"; else echo "- no step command has run yet"; fi
    [ -s "$WORK/skipped.txt" ] && echo "- skipped (budget): $(tr '\n' ' ' < "$WORK/skipped.txt")"
    for f in kernels_summary.md host_probes.md kernel_knobs.md knn_knobs.md lora_parts.md e2e_summary.md profile_e2e_step/categories.txt \
             profile_e2e_step/summary.json; do
      [ -f "$WORK/$f" ] && { echo; echo "## $f"; echo; cat "$WORK/$f"; }
    done
  } > "$STAGE/summary.md" 2>/dev/null
  put "$STAGE/summary.md" summary.md
  [ -f "$WORK/device.txt" ] && put "$WORK/device.txt" device.txt
  put "$WORK/skipped.txt" skipped.txt
  # the eager ViT trace: gzipped once per new trace, returned on its own when under 16 MiB
  local trace="$WORK/profile_vitb16/trace.json" gz="$WORK/trace.json.gz"
  if [ -f "$trace" ] && { [ ! -f "$gz" ] || [ "$trace" -nt "$gz" ]; }; then
    if bounded "" TERM "$QUICK_GRACE" 120 gzip -c "$trace" > "$gz.tmp"; then mv -f "$gz.tmp" "$gz"; else rm -f "$gz.tmp"; fi
  fi
  if [ -f "$gz" ]; then
    if [ "$(stat -c %s "$gz")" -le "$max" ]; then put "$gz" trace.json.gz
    else note "trace.json.gz is over 16 MiB: not returned (top_ops.txt and stages.txt are in results.tgz)"; fi
  fi
  # every log and JSON; the steady-state profile's trace.json.gz too, not the eager ViT one (above)
  local tgz="$STAGE/results.tgz"
  rm -f "$tgz"
  fast tar czf "$tgz" -C "$WORK" --anchored --exclude=./profile_vitb16/trace.json \
    --exclude='./profile_vitb16/.trace.json.*' --exclude=./trace.json.gz --exclude=./trace.json.gz.tmp .
  rc=$?  # 1: a file changed while read (still a whole archive)
  if [ "$rc" -le 1 ] && [ -f "$tgz" ] && [ "$(stat -c %s "$tgz")" -gt "$max" ]; then
    note "results.tgz was over 16 MiB: rebuilt without any trace (profile_e2e_step/trace.json.gz included)"
    rm -f "$tgz"
    fast tar czf "$tgz" -C "$WORK" --no-anchored --exclude='*trace.json*' .
    rc=$?
  fi
  if [ "$rc" -le 1 ] && [ -f "$tgz" ]; then put "$tgz" results.tgz; else echo "gpu_suite.sh: results.tgz not refreshed (tar exit $rc)" >&2; fi
}
pack() {  # the final refresh of $OUT, from RESERVE: `segpcl-fast env` (which path each op takes, after
  local rc=$?  # the ext step built, or did not build, the CUDA kernels), then save
  trap - EXIT
  POOL=left_all
  local l; l=$(left_all); l=$(( l - 3 < 60 ? l - 3 : 60 ))  # 3 s for the save after it
  { echo; echo "== segpcl-fast env =="; quick "" "$l" "$PYTHON" -m segpcl_fast.cli env \
    || echo "(segpcl-fast env: exit $?; 124 or 137: stopped at its limit, 125: not started)"; } \
    >> "$WORK/device.txt" 2>&1
  save
  rm -rf "$STAGE"
  ls -la "$OUT"
  exit "$rc"
}
trap pack EXIT

{
  quick "" 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv 2>&1 || true
  quick "" 90 "$PYTHON" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name(0))"
  quick "" 90 "$PYTHON" -c "import xformers, xformers.ops as xo, torch; q = torch.randn(1, 8, 2, 64, device='cuda', dtype=torch.bfloat16); xo.memory_efficient_attention(q, q, q); print('xformers', xformers.__version__, 'runs')" 2>&1 | tail -1
  echo "steps: $STEPS; budget: $BUDGET s (reserve $RESERVE s); date: $(date -u +%Y-%m-%dT%H:%MZ); commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} > "$WORK/device.txt" 2>&1
# no CUDA device: every step tests or times CUDA paths, and on the CPU they half-ran (the CUDA rows skipped and the
# bench step still read "exit 0", the GPU probes and sweeps ended in tracebacks, the ext step compiled for minutes,
# the ViT-B/16 profile ran on the CPU): one clear refusal instead, before any step (device.txt still returns)
if ! quick "" 90 "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)" >/dev/null 2>&1; then
  echo "gpu_suite.sh: no CUDA device is visible to torch here ($PYTHON: torch.cuda.is_available() is False, or torch" \
    "does not import): every step of this suite tests or times CUDA paths, so none is run. Run it on a GPU machine;" \
    "on the CPU, time the benchmarks with: python -m pytest benchmarks/ --benchmark-only" | tee -a "$WORK/device.txt" >&2
  echo "no step run: torch sees no CUDA device here (device.txt)" >> "$WORK/steps.txt"
  exit 2
fi
NEEDS_OPEN_CLIP="e2e profile"  # the ViT-B/16 model comes from open_clip (not in the device image)
if quick "" 90 "$PYTHON" -c "import open_clip; print('open_clip', open_clip.__version__)" >> "$WORK/device.txt" 2>&1; then
  HAVE_OPEN_CLIP=1
else
  HAVE_OPEN_CLIP=0; echo "open_clip is not importable: the e2e and profile steps will be skipped" >> "$WORK/device.txt"
fi
quick "" 60 "$PYTHON" -c "import torchattacks" >/dev/null 2>&1 \
  || echo "torchattacks is not importable: the PGD peer test will skip" >> "$WORK/device.txt"
cat "$WORK/device.txt"
save

# CUDA variants of tests/kernels (the CPU-interpreter variants skip with TRITON_INTERPRET=0), in
# KERNEL_WORKERS pytest-xdist processes where xdist imports, else in one
if starts kernels; then
XDIST=()
if [ "$KERNEL_WORKERS" -gt 1 ] && quick "" 60 "$PYTHON" -c "import xdist" >/dev/null 2>&1; then
  XDIST=(-n "$KERNEL_WORKERS")
fi
TRITON_INTERPRET=0 run_step kernels "$PYTHON" -m pytest tests/kernels -q -rs -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} \
  --junitxml="$WORK/kernel_tests.xml" 2>&1 | tee "$WORK/kernel_tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
save
fi

# every benchmark file but e2e (its own step) and transforms (CPU-only data pipeline): eager /
# compiled reference / fast paths, CUDA rows
# (the LoRA benchmarks run in the ext step, with the extension built)
if starts bench; then
if part bench-pytest; then  # the benchmarks alone, without the knob sweeps below (bench-tune, bench-knn)
TRITON_INTERPRET=0 run_step bench-pytest "$PYTHON" -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
  --ignore=benchmarks/test_bench_e2e.py --ignore=benchmarks/test_bench_transforms.py \
  --ignore=benchmarks/test_bench_lora_linear.py -k "not cpu and not tiny" \
  --benchmark-json="$WORK/benchmarks.json" --benchmark-columns=min,median,max,rounds 2>&1 | tee "$WORK/benchmarks.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
save
fi
if part bench-summary; then  # a compact table of the kernel benchmarks: median ms, GB/s, fraction of copy bandwidth
quick bench-summary 60 "$PYTHON" benchmarks/summarize_kernels.py "$WORK/benchmarks.json" 2>&1 | tee "$WORK/kernels_summary.md"
save
fi
# a step's anchor batch from a CPU-resident anchor cache (acgd.source=new_data / folder): the old gather-then-pin
# path against gather_to_device, synchronised (BENCHMARKS.md, session 50: measured on the CPU only)
if part bench-host; then
quick bench-host 60 "$PYTHON" benchmarks/host_probes.py anchor_gather --device cuda --steps 5 2>&1 \
  | tee "$WORK/host_probes.md"
save
fi
# knob sweep (anchor_kl: one tile vs chunk sizes per row width), to set the kernels' defaults
if part bench-tune; then
TRITON_INTERPRET=0 bounded bench-tune INT "$KILL_GRACE" "$TUNE_TIMEOUT" "$PYTHON" benchmarks/tune_kernels_cuda.py 2>&1 \
  | tee "$WORK/kernel_knobs.md"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
save
fi
# knn_subgraph_kl at the large size: forward and backward timed apart, at the defaults and other programs / warps
if part bench-knn; then
TRITON_INTERPRET=0 bounded bench-knn INT "$KILL_GRACE" "$TUNE_TIMEOUT" "$PYTHON" benchmarks/tune_kernels_cuda.py knn 2>&1 \
  | tee "$WORK/knn_knobs.md"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
save
fi
fi

# segpcl_fast._C with CUDA kernels (LoRA-B linear): build, GPU tests, fwd+bwd benchmark vs peft/base
if starts ext; then
NVCC="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)"
TOOLKIT="$(dirname "$(dirname "$NVCC")")"  # nvcc's toolkit; an nvcc wrapper script (/usr/local/bin/nvcc) has none
if [ ! -f "$TOOLKIT/include/cuda_runtime.h" ] && [ -f /usr/local/cuda/include/cuda_runtime.h ]; then TOOLKIT=/usr/local/cuda; fi
if part ext-build; then
CUDA_HOME="${CUDA_HOME:-$TOOLKIT}" SEGPCL_WITH_CUDA=1 \
  run_step ext-build "$PYTHON" setup.py build_ext --inplace > "$WORK/ext_build.txt" 2>&1 || status=1
save
fi
if part ext-tests; then
run_step ext-tests "$PYTHON" -m pytest tests/ops/test_lora_linear_cuda.py tests/ops/test_lora_linear_merged.py tests/ops/test_func_transforms.py \
  tests/model/test_vit_tail.py -q -rs \
  -p no:cacheprovider 2>&1 | tee "$WORK/lora_linear_cuda_tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
save
fi
if part ext-bench; then
run_step ext-bench "$PYTHON" -m pytest benchmarks/test_bench_lora_linear.py --benchmark-only -q -p no:cacheprovider -k cuda \
  --benchmark-json="$WORK/bench_lora_linear.json" 2>&1 | tee "$WORK/bench_lora_linear.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
save
fi
if part ext-parts; then
run_step ext-parts "$PYTHON" benchmarks/lora_parts_cuda.py 2>&1 | tee "$WORK/lora_parts.md"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
save
fi
fi

# end-to-end training step (issue 7): images/s and MFU against the bf16 matmul peak measured in
# the same run (a measured peak, below the H100's 989 TFLOP/s spec, so MFU reads higher than a spec-based one)
e2e_variants() {  # e2e_variants VARIANT...: one pytest per chosen variant, each writing its own JSON, so
  local variant   # running out of budget loses only the variants not yet run
  for variant in "$@"; do
    part "e2e-$variant" || continue
    local need="$MIN_COMPILED_VARIANT_S" need_name=MIN_COMPILED_VARIANT_S
    case "$variant" in eager_*) need="$MIN_VARIANT_S"; need_name=MIN_VARIANT_S;; esac
    if [ "$(left)" -lt "$need" ]; then
      echo "e2e-$variant" >> "$WORK/skipped.txt"
      echo "e2e variant $variant skipped: $(left) s of budget left ($need_name=$need)" >&2
      continue
    fi
    # one matmul peak for every variant's MFU: the first variant measures it into this file, the rest read it
    SEGPCL_BENCH_PEAK_FILE="$WORK/matmul_peak.json" TRITON_INTERPRET=0 \
      run_step "e2e-$variant" "$PYTHON" -m pytest benchmarks/test_bench_e2e.py --benchmark-only -q \
      -p no:cacheprovider -k "cuda and $variant" --benchmark-json="$WORK/bench_e2e_$variant.json" 2>&1 \
      | tee "$WORK/bench_e2e_$variant.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    save
  done
}
e2e_summary() {
  local e2e_json
  shopt -s nullglob; e2e_json=("$WORK"/bench_e2e_*.json); shopt -u nullglob
  if [ "${#e2e_json[@]}" -gt 0 ]; then
    quick e2e-summary 90 "$PYTHON" benchmarks/test_bench_e2e.py "${e2e_json[@]}" 2>&1 | tee "$WORK/e2e_summary.md"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  else
    echo "no e2e variant wrote its JSON (bench_e2e_*.json)" | tee "$WORK/e2e_summary.md"; status=1
  fi
  save
}
# most telling first (compiled_fused, the best row measured, 29-31 % MFU on the H200; cudagraphs_fused,
# the same under CUDA graphs, never run: the H200 profile found the compiled step launch-bound); the E2E_EXTRA variants
# follow the profile step when the whole e2e step is chosen, here when named one by one
E2E_LATER=""
if starts e2e; then
  e2e_variants $E2E_VARIANTS
  if part e2e; then E2E_LATER="$E2E_EXTRA"; else e2e_variants $E2E_EXTRA; fi
  if [ -n "$E2E_VARIANTS" ] || [ -z "$E2E_LATER" ]; then e2e_summary; fi  # (else after the later variants)
fi

# profile of 5 steps of task 2 with ViT-B/16 (random weights): trace + top kernels + stages.
# Eager: with run.compile=true task 2's new graphs would compile inside the profiled window.
# First the steady-state compiled step of the e2e benchmark (compiled before the window): where
# its time goes by kind of kernel, and how fast its GEMM + attention kernels run on their own.
if starts profile "$(part profile-e2e_step && echo "$MIN_PROFILE_S" || echo "$MIN_STEP_S")"; then
if part profile-e2e_step; then
TRITON_INTERPRET=0 run_step profile-e2e_step "$PYTHON" benchmarks/profile_e2e_step.py --device cuda --variant compiled_fused \
  --steps 5 -o "$WORK/profile_e2e_step" > "$WORK/profile_e2e_step.txt" 2>&1 || status=1
save
fi
if part profile-vitb16; then
run_step profile-vitb16 "$PYTHON" -m segpcl_fast.cli profile --steps 5 -o "$WORK/profile_vitb16" --set model.name=ViT-B-16 \
  --set model.pretrained=none --set data.max_train_per_class=3 --set run.precision=bf16 --set run.compile=false \
  > "$WORK/profile_vitb16.txt" 2>&1 || status=1
save
fi
fi

if [ -n "$E2E_LATER" ]; then
  e2e_variants $E2E_LATER
  e2e_summary
fi

exit $status
