#!/usr/bin/env bash
# On a GPU machine: run the CUDA kernel tests (real Triton, no interpreter) and the benchmarks,
# writing everything under $OUT (default ./gpu_results). Others may append steps below.
#
#   OUT=/some/dir bash benchmarks/gpu_suite.sh
#   STEPS="kernels bench" bash benchmarks/gpu_suite.sh   # a subset, e.g. to split it over two 10-min calls
#
# Steps, in order: kernels (CUDA kernel tests), bench (every benchmark + kernel summary),
# ext (build the CUDA extension, its tests and benchmark), e2e (training-step MFU), profile
# (ViT-B/16). device.txt is always written.
#
# Files: device.txt (GPU, driver, torch/triton versions), kernel_tests.{txt,xml},
# benchmarks.{txt,json}; exit status non-zero when any step failed (all steps still run).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_results}"
mkdir -p "$OUT"
status=0
STEPS="${STEPS:-kernels bench ext e2e profile}"
for step in $STEPS; do
  case " kernels bench ext e2e profile " in *" $step "*) ;; *) echo "unknown step '$step' in STEPS; choose from: kernels bench ext e2e profile" >&2; exit 2;; esac
done
want() { case " $STEPS " in *" $1 "*) return 0;; *) return 1;; esac; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv 2>&1 || true
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name(0))"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

# CUDA variants of tests/kernels (the CPU-interpreter variants skip with TRITON_INTERPRET=0)
if want kernels; then
TRITON_INTERPRET=0 python -m pytest tests/kernels -q -rs -p no:cacheprovider \
  --junitxml="$OUT/kernel_tests.xml" 2>&1 | tee "$OUT/kernel_tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

# every benchmark file: eager / compiled reference / fast paths, paper and roofline sizes
if want bench; then
TRITON_INTERPRET=0 python -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$OUT/benchmarks.json" --benchmark-columns=min,median,max,rounds 2>&1 | tee "$OUT/benchmarks.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# a compact table of the kernel benchmarks: median ms, GB/s, fraction of copy bandwidth
python benchmarks/summarize_kernels.py "$OUT/benchmarks.json" | tee "$OUT/kernels_summary.md"
fi

# segpcl_fast._C with CUDA kernels (LoRA-B linear): build, GPU tests, fwd+bwd benchmark vs peft/base
if want ext; then
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" SEGPCL_WITH_CUDA=1 python setup.py build_ext --inplace > "$OUT/ext_build.txt" 2>&1 || status=1
python -m pytest tests/ops/test_lora_linear_cuda.py -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/lora_linear_cuda_tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
python -m pytest benchmarks/test_bench_lora_linear.py --benchmark-only -q -p no:cacheprovider -k cuda \
  --benchmark-json="$OUT/bench_lora_linear.json" 2>&1 | tee "$OUT/bench_lora_linear.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

# end-to-end training step (issue 7): images/s and MFU vs the bf16 matmul peak measured in the same run
# (reads the bench step's json; when bench did not run in this call, times the e2e benchmark alone)
if want e2e; then
e2e_json="$OUT/benchmarks.json"
if ! want bench; then
  e2e_json="$OUT/bench_e2e.json"
  TRITON_INTERPRET=0 python -m pytest benchmarks/test_bench_e2e.py --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$e2e_json" 2>&1 | tee "$OUT/bench_e2e.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
python benchmarks/test_bench_e2e.py "$e2e_json" | tee "$OUT/e2e_summary.md"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
# profile of 5 steps of task 2 with ViT-B/16 (random weights) on the offline world: trace + top kernels + stages
if want profile; then
python -m segpcl_fast.cli profile --steps 5 -o "$OUT/profile_vitb16" --set model.name=ViT-B-16 \
  --set model.pretrained=none --set data.max_train_per_class=3 --set run.precision=bf16 --set run.compile=true \
  > "$OUT/profile_vitb16.txt" 2>&1 || status=1
fi

exit $status
