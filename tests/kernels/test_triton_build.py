"""The ahead-of-time compile check (segpcl_fast.kernels.check_triton_build): every Triton kernel,
as its launcher calls it, compiles for sm_89 and sm_90 and fits what a launch there allows.

The compiles run in fresh processes: this pytest process runs the interpreter (conftest.py).
About 45 s on 2 cores with an empty Triton cache, a few seconds with a warm one.
"""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from segpcl_fast.ops._kernels import load_kernel

pytest.importorskip("triton")
check_build = load_kernel("check_triton_build")
cpu_side = pytest.mark.skipif(torch.cuda.is_available(), reason="the check stands in for a GPU; on a GPU machine the "
                              "cuda tests compile and run every kernel, and test_static_usage_equals_the_loaded_kernels "
                              "holds the check to the driver, so this would only spend device time")
needs_binder = pytest.mark.skipif(check_build.binder_available() is not None,
                                  reason=f"{check_build.binder_available()}: the check cannot bind arguments")
# every kernel module of the package (a new one is covered without editing this list)
KERNEL_MODULES = tuple(sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "segpcl_fast" / "kernels")
                              .glob("*.py") if not p.stem.startswith("_") and p.stem != "check_triton_build"))


def _compile_env():
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    return env


def _launched_kernels() -> set[str]:
    """Every @lazy_jit function a module launches (`name[grid](...)`); helpers are only called."""
    lazy_jit = load_kernel("_triton_utils").lazy_jit
    names = set()
    for module_name in KERNEL_MODULES:
        module = load_kernel(module_name)
        source = Path(module.__file__).read_text()
        for name, value in vars(module).items():
            jitted = isinstance(value, lazy_jit) or callable(getattr(value, "fn", None))  # bound after a launch
            if jitted and re.search(rf"\b{re.escape(name)}\[", source):
                names.add(name)
    return names


@pytest.mark.slow
@needs_binder
@cpu_side
def test_every_kernel_compiles_and_fits_on_sm89_and_sm90(tmp_path):
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "segpcl_fast.kernels.check_triton_build", "--json", str(report)],
                          env=_compile_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "all compile and fit" in proc.stdout
    data = json.loads(report.read_text())
    assert data["ok"] and data["archs"] == [89, 90]
    compiled = {(k["kernel"], k["arch"]) for k in data["kernels"]}
    expected = _launched_kernels()
    assert expected == {"_pgd_step_kernel", "_pgd_step_channels_last_kernel", "_anchor_kl_kernel", "_anchor_kl_chunked_kernel", "_scale_grad_kernel",
                        "_knn_kl_fwd_kernel", "_knn_kl_bwd_kernel", "_lora_merge_kernel", "_lora_fwd_kernel",
                        "_lora_bwd_kernel"}
    assert compiled == {(name, arch) for name in expected for arch in (89, 90)}
    for k in data["kernels"]:
        assert k["registers"] > 0 and k["num_warps"] in (1, 2, 4, 8, 16) and 0 < k["occupancy"] <= 1, k
        assert not k["problems"], k
    # the launchers' own choices reached the compiler: one-tile anchor_kl up to SINGLE_BLOCK_COLS, bf16 storage
    widths = {k["constexprs"]["BLOCK_C"] for k in data["kernels"] if k["kernel"] == "_anchor_kl_kernel"}
    assert max(widths) == load_kernel("anchor_kl").SINGLE_BLOCK_COLS
    assert any(k["pointers"].startswith("bf16") for k in data["kernels"] if k["kernel"] == "_pgd_step_kernel")


BROKEN = '''
from __future__ import annotations
import json, sys
import torch
from segpcl_fast.kernels._triton_utils import lazy_jit
from segpcl_fast.kernels.check_triton_build import Case, check

tl = None


@lazy_jit
def not_a_power_of_two(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) * 2)


@lazy_jit
def big_tiles(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    m = tl.arange(0, BM)
    n = tl.arange(0, BN)
    k = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptr + m[:, None] * K + (k0 + k)[None, :])
        b = tl.load(b_ptr + (k0 + k)[:, None] * BN + n[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + m[:, None] * BN + n[None, :], acc)


def raises():
    raise ValueError("bad sizes")


meta = torch.device("meta")
x = torch.empty(64, device=meta)
a = torch.empty(128, 4096, dtype=torch.bfloat16, device=meta)
b = torch.empty(4096, 128, dtype=torch.bfloat16, device=meta)
c = torch.empty(128, 128, device=meta)
results = check([
    Case("ok", lambda: not_a_power_of_two[(1,)](x, BLOCK=64)),
    Case("arange 48", lambda: not_a_power_of_two[(1,)](x, BLOCK=48)),
    Case("128x128x128 bf16 tiles, 3 stages", lambda: big_tiles[(1,)](a, b, c, 4096, BM=128, BN=128, BK=128,
                                                                       num_stages=3)),
    Case("grid", lambda: not_a_power_of_two[(1, 70000)](x, BLOCK=64)),
    Case("launcher", raises),
])
json.dump([[r.case, r.kernel, r.arch, r.shared_bytes, r.problems] for r in results], sys.stdout)
'''


@cpu_side
@needs_binder
def test_the_check_fails_what_a_launch_would_refuse(tmp_path):
    """A compile error, shared memory over the 4090's 99 KiB (fits the H100's 227 KiB), a grid over
    CUDA's 65535 on axis 1, and a launcher that raises: each is reported on its own case."""
    script = tmp_path / "broken_kernels.py"  # Triton needs the kernels' source in a file
    script.write_text(textwrap.dedent(BROKEN))
    proc = subprocess.run([sys.executable, str(script)], env=_compile_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    problems = {}
    for case, kernel, arch, shared, found in rows:
        problems.setdefault(case, {})[arch] = (shared, found)
    assert problems["ok"] == {89: (0, []), 90: (0, [])}
    for arch in (89, 90):
        assert problems["arange 48"][arch][1][0].startswith("does not compile"), problems["arange 48"]
        assert any("grid axis 1 = 70000" in p for p in problems["grid"][arch][1]), problems["grid"]
    shared_89, found_89 = problems["128x128x128 bf16 tiles, 3 stages"][89]
    shared_90, found_90 = problems["128x128x128 bf16 tiles, 3 stages"][90]
    assert shared_89 > 99 * 1024 and found_89 == [f"shared memory {shared_89} B > 101376 B per block on sm_89"]
    assert 99 * 1024 < shared_90 <= 227 * 1024 and found_90 == []
    assert problems["launcher"][0][1] == ["launcher raised ValueError: bad sizes"]


KNOBS = '''
import json, sys
import torch
from segpcl_fast.kernels import anchor_kl
from segpcl_fast.kernels.check_triton_build import Case, check

z = torch.empty(8192, 1000, device="meta")
cases = [Case(str(w), lambda w=w: anchor_kl.anchor_kl_triton(z, z, 20.0, num_warps=w)) for w in (None, 8, 16)]
json.dump([[r.case, r.num_warps, r.constexprs["ROWS"], r.registers, r.occupancy] for r in check(cases, [90])],
          sys.stdout)
'''


@cpu_side
@needs_binder
def test_anchor_kl_warps_knob_reaches_the_compiler(tmp_path):
    """num_warps (swept by benchmarks/tune_kernels_cuda.py) is what gets compiled: the default 4
    warps hold 16 elements of the 2 x 1024 tile a thread; 8 and 16 warps fewer, so fewer registers."""
    script = tmp_path / "knobs.py"
    script.write_text(KNOBS)
    proc = subprocess.run([sys.executable, str(script)], env=_compile_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {case: rest for case, *rest in json.loads(proc.stdout.strip().splitlines()[-1])}
    assert [rows[c][:2] for c in ("None", "8", "16")] == [[4, 2], [8, 2], [16, 2]]
    regs = [rows[c][2] for c in ("None", "8", "16")]
    occupancy = [rows[c][3] for c in ("None", "8", "16")]
    assert regs[0] > regs[1] > regs[2] and occupancy[0] < occupancy[1] <= occupancy[2], rows


KNN_KNOBS = '''
import json, sys
sys.path.insert(0, sys.argv[1])  # benchmarks/
import tune_kernels_cuda as tune
from segpcl_fast.kernels import check_triton_build as check_build

p = tune.meta_knn_problem(5000, 200, 10, 512)
json.dump([[part, knobs, *tune.knn_usage(check_build, part, run, 90)] for part, knobs, run in tune.knn_runs(p)],
          sys.stdout)
'''


@cpu_side
@needs_binder
def test_knn_sweep_variants_compile_with_their_knobs(tmp_path):
    """benchmarks/tune_kernels_cuda.py knn (gpu_suite's bench-knn): every variant of its sweep reaches the compiler
    with its own warps (the launchers' num_warps knob; defaults 8 forward at a 16 x 512 tile, 2 backward) and
    compiles without spilling; the forward on 4 warps holds more of the tile a thread, so more registers."""
    script = tmp_path / "knn_knobs.py"
    script.write_text(KNN_KNOBS)
    benchmarks = Path(__file__).resolve().parents[2] / "benchmarks"
    proc = subprocess.run([sys.executable, str(script), str(benchmarks)], env=_compile_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sum(part == "forward" for part, *_ in rows) >= 3 and sum(part == "backward" for part, *_ in rows) >= 3
    warps = {(part, knobs): int(w) for part, knobs, w, *_ in rows}
    assert warps[("forward", "default")] == 8 and warps[("backward", "default")] == 2
    for part, knobs, w, regs, spill, occupancy in rows:
        want = re.search(r"num_warps (\d+)", knobs)
        assert want is None or int(want.group(1)) == int(w), (part, knobs, w)
        assert regs.isdigit() and spill == "0", (part, knobs, regs, spill)
    regs = {(part, knobs): int(r) for part, knobs, _, r, *_ in rows}
    assert regs[("forward", "num_warps 4")] > regs[("forward", "default")]


def test_sass_count_reads_every_address_width():
    """cuobjdump writes addresses with 4 hex digits up to 0xfff0 and 5 from 0x10000: a kernel past
    4096 instructions was undercounted at 4096 when only 4 were read."""
    lines = [f"        /*{addr:04x}*/                   FADD R{i % 9}, R1, R2 ;   /* 0x000fe20000000000 */"
             for i, addr in enumerate(range(0, 0x10000 + 0x40, 0x10))]
    lines[3] = "        /*0030*/              @!P0 BRA `(.L_x_1) ;   /* 0x0000000000008947 */"
    lines += ["        /*10040*/                   BRA 0x10040;", "        /*10050*/                   NOP;"]
    assert check_build.count_sass("\n".join(lines)) == 0x1004



def test_longest_loop_is_counted_from_a_backward_branch_to_its_target():
    """A loop's body: from the target of a branch back to it, both counted; forward branches and the
    closing self-branch are not loops."""
    body = ["FADD R1, R1, R2", "FMUL R3, R1, R1", "@P0 BRA 0x0060", "IADD3 R4, R4, 0x1, RZ",
            "ISETP.NE.AND P1, PT, R4, 0x20, PT", "@P1 BRA `(.L_x_2) 0x0010", "EXIT", "BRA 0x0080"]
    listing = "\n".join(f"        /*{0x10 * (i + 1):04x}*/                   {text} ;   /* 0x000fe20000000000 */"
                         for i, text in enumerate(body))
    assert check_build.longest_loop_sass(listing) == 6  # 0x0010 .. 0x0060
    assert check_build.longest_loop_sass(listing.replace("(.L_x_2) 0x0010", "(.L_x_2) 0x0090")) == 0

INSTRUCTIONS = '''
import json, sys
import torch
from segpcl_fast.kernels import anchor_kl
from segpcl_fast.kernels.check_triton_build import Case, check

cases = []
for cols in (1000, 4096):
    for logprob in (False, True):
        z = torch.empty(8192, cols, device="meta")
        cases.append(Case(f"{cols} {logprob}", lambda z=z, logprob=logprob: anchor_kl.anchor_kl_triton(z, z, 20.0, logprob)))
json.dump([[r.case, r.num_warps, r.constexprs["ROWS"], r.constexprs["BLOCK_C"], r.instructions]
           for r in check(cases, [90])], sys.stdout)
'''


@cpu_side
@needs_binder
def test_anchor_kl_one_tile_kernel_stays_cheap_per_element(tmp_path):
    """The one-tile kernel's sm_90 SASS, counted statically (it has no loop), per element a thread holds
    (16 at 1000 classes, 8 at 4096). Written with a division by tau per element and p = exp(log p): 82
    an element at 1000 classes (as many cycles as the bytes take: 64 % of copy bandwidth on an H200),
    78 at 4096. Per-row reciprocals and one exponential per input: 57.5 and 59.6 (log-prob teacher 47
    and 49.4) on Triton 3.8, 57.6 and 62.0 (47.9 and 51.4) on Triton 3.6 (the H200 device's). Then the
    softmaxes in base 2 (exp2 is one instruction, exp five) and loads and stores of 4 fp32 at widths
    that are not multiples of 16 (the VEC hints): 43.6 and 51.9 (35.1 and 42.5) on Triton 3.8, 44.8 and
    55.2 (36.7 and 44.5) on Triton 3.6. Each bound fails both older forms."""
    script = tmp_path / "instructions.py"
    script.write_text(INSTRUCTIONS)
    proc = subprocess.run([sys.executable, str(script)], env=_compile_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    bounds = {"1000 False": 50, "4096 False": 57, "1000 True": 42, "4096 True": 47}
    for case, warps, rows, block, instructions in json.loads(proc.stdout.strip().splitlines()[-1]):
        per_element = instructions / (rows * block / (32 * warps))
        assert instructions > 0 and per_element < bounds[case], (case, warps, rows, block, instructions)


MERGE_LOOP = '''
import json, sys
import torch
from segpcl_fast.kernels import check_triton_build as ctb, lora_merge

results = []
for dtype in (torch.bfloat16, torch.float32):
    w = torch.empty(3072, 768, dtype=dtype, device="meta")
    a, b = torch.empty(32, 768, dtype=dtype, device="meta"), torch.empty(3072, 32, dtype=dtype, device="meta")
    (r,) = ctb.check([ctb.Case("merge", lambda: lora_merge.lora_merged_weight_triton(w, a, b, 2.0))], [90])
    per_thread = r.constexprs["BLOCK_O"] * r.constexprs["BLOCK_I"] / (32 * r.num_warps)
    results.append([str(dtype), r.loop_instructions, per_thread])
json.dump(results, sys.stdout)
'''


@cpu_side
@needs_binder
def test_lora_merge_rank_step_stays_cheap_per_element(tmp_path):
    """W + s B A: each of the r rank steps adds one product to every element of the tile. On 4 warps a
    thread loaded its 32 values of B's column from global memory one at a time in every step: the sm_90
    loop took 182 instructions for 32 elements in bf16 (5.7 an element a step; fp32 127 / 32 = 4.0). On
    2 warps a thread holds one column of the 64 x 64 tile and reads B through shared memory: 98 for 64
    (1.5; fp32 96 / 64). Triton 3.6 (the H200 device's): 182 / 32 and 127 / 32 before, 192 / 64 (3.0) and
    96 / 64 now. The bound fails the 4-warp form on both."""
    script = tmp_path / "merge_loop.py"
    script.write_text(MERGE_LOOP)
    proc = subprocess.run([sys.executable, str(script)], env=_compile_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for dtype, body, per_thread in json.loads(proc.stdout.strip().splitlines()[-1]):
        assert 0 < body / per_thread < 3.5, (dtype, body, per_thread)


KNN_COUNTS = '''
import json, sys
from segpcl_fast.kernels import check_triton_build as ctb
cases = [c for c in ctb.default_cases() if c.name == "knn_subgraph_kl 1000 classes 200x10 d512 fp32"]
json.dump([[r.kernel, r.instructions] for r in ctb.check(cases, [90])], sys.stdout)
'''


@cpu_side
@needs_binder
def test_knn_kernels_stay_cheap(tmp_path):
    """knn_subgraph_kl at k 10, d 512, fp32, static sm_90 instructions: the forward with a division by
    tau per neighbour, tl.exp and a division of each exponential by the sum took 815 (Triton 3.6: 834);
    in base 2 with one division per root 754 (735). The backward's contribution numbers were 64-bit
    (a division by k branched to a 64-bit routine): 679 (687); in int32 503 (498). The bounds fail the
    old forms."""
    script = tmp_path / "knn_counts.py"
    script.write_text(KNN_COUNTS)
    proc = subprocess.run([sys.executable, str(script)], env=_compile_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    counts = dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert 0 < counts["_knn_kl_fwd_kernel"] < 790 and 0 < counts["_knn_kl_bwd_kernel"] < 600, counts


@pytest.mark.parametrize("cols, rows, warps", [(10, 128, 16), (200, 2, 4), (1000, 2, 4), (4096, 1, 16)])
def test_anchor_kl_default_tile_is_the_sweeps_fastest(monkeypatch, cols, rows, warps):
    """On a GPU the one-tile kernel's default (rows, warps) at each width the H200 sweep measured
    (BENCHMARKS.md, 2026-12-04) is that sweep's fastest variant (test_anchor_kl_warps_knob_reaches_the_compiler
    checks that the default is what gets compiled); every width the one-tile kernel takes has a default."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    anchor_kl = load_kernel("anchor_kl")
    assert (anchor_kl.tile_rows(8192, cols), anchor_kl.tile_warps(anchor_kl.tile_rows(8192, cols), cols)) == \
        (rows, warps)
    for width in range(1, anchor_kl.SINGLE_BLOCK_COLS + 1, 7):
        tile_rows = anchor_kl.tile_rows(8192, width)
        assert tile_rows >= 1 and anchor_kl.tile_warps(tile_rows, width) in (4, 8, 16)


@pytest.mark.parametrize("arch, warps, regs, shared, expected", [
    (90, 4, 255, 1024, 8 / 64),   # 255 regs -> 8192 per warp: 2 blocks of 4 warps
    (90, 4, 45, 16, 40 / 64),     # 45 -> 1536 per warp: 10 blocks
    (89, 4, 45, 16, 40 / 48),     # the same block on a 4090 (48 warps per SM)
    (89, 8, 32, 0, 48 / 48),      # warp-limited: 6 blocks of 8
    (90, 4, 32, 100 * 1024, 8 / 64),  # shared-limited: 228 KiB / (100 KiB + 1 KiB) = 2 blocks
    (90, 1, 16, 0, 32 / 64),      # block-limited: at most 32 blocks per SM
    (89, 2, 192, 0, 8 / 48),      # 6144 per warp: 2 warps in each 16384-register sub-partition, 4 blocks
    (90, 4, 32, 99 * 1024 + 1, 8 / 64),  # 101377 + 1024 rounds up to 102528 B: 2 blocks in 228 KiB
])
def test_occupancy_by_hand(arch, warps, regs, shared, expected):
    assert check_build.occupancy(arch, warps, regs, shared) == pytest.approx(expected)


def test_an_arch_without_limits_is_refused_not_guessed():
    with pytest.raises(ValueError, match="no SM limits for sm_75; known: sm_80, sm_86, sm_89, sm_90"):
        check_build.occupancy(75, 4, 32, 0)
    with pytest.raises(ValueError, match="no SM limits for sm_120"):
        check_build.launch_problems(120, (1,), 4, 32, 0)
    proc = subprocess.run([sys.executable, "-m", "segpcl_fast.kernels.check_triton_build", "--archs", "89,100"],
                          env=_compile_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "no SM limits for sm_100" in proc.stderr


def test_launch_problems_by_hand():
    assert check_build.launch_problems(90, (10, 3), 4, 255, 227 * 1024) == []
    assert check_build.launch_problems(89, (10,), 4, 32, 227 * 1024) == [
        f"shared memory {227 * 1024} B > {99 * 1024} B per block on sm_89"]
    assert check_build.launch_problems(90, (0,), 4, 32, 0) == ["grid axis 0 = 0 outside 1..2147483647"]
    assert check_build.launch_problems(90, (1,), 32, 128, 0) == ["128 registers x 1024 threads > 65536 registers per block"]


@needs_binder
@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("0", "") or not torch.cuda.is_available(),
                    reason="needs a CUDA device and TRITON_INTERPRET=0 (benchmarks/gpu_suite.sh's kernels step)")
def test_static_usage_equals_the_loaded_kernels():
    """On a GPU: what the check reads off the cubin (registers, spills, shared memory) is what the
    driver reports for the same kernels launched for real on this device."""
    from triton.runtime.jit import JITFunction

    arch = int("".join(map(str, torch.cuda.get_device_capability())))
    z = torch.randn(512, 1000, device="cuda")
    x = torch.randn(4, 3, 32, 32, device="cuda")
    params = [torch.full((3,), 0.1, device="cuda") for _ in range(4)]
    launchers = [lambda: load_kernel("anchor_kl").anchor_kl_triton(z, z + 1, 20.0),
                 lambda: load_kernel("anchor_kl").anchor_kl_triton(z, z + 1, 20.0, chunk_cols=256),
                 lambda: load_kernel("pgd_step").pgd_step_triton(x, x, x, *params)]
    static = check_build.check([check_build.Case(str(i), run) for i, run in enumerate(launchers)], [arch])
    loaded = []
    real_run = JITFunction.run

    def keep(self, *args, **kwargs):
        kernel = real_run(self, *args, **kwargs)
        loaded.append(kernel)
        return kernel

    JITFunction.run = keep
    try:
        for run in launchers:
            run()
        torch.cuda.synchronize()
    finally:
        JITFunction.run = real_run
    assert [s.kernel for s in static] == [k.name for k in loaded]
    for s, k in zip(static, loaded):
        # Triton's n_spills is the driver's local memory per thread in 4-byte words
        assert (s.registers, s.spill_bytes, s.shared_bytes) == (k.n_regs, 4 * k.n_spills, k.metadata.shared), s.kernel


SPILL = '''
import json, sys
import torch
from segpcl_fast.kernels import knn_subgraph_kl as knn
from segpcl_fast.kernels.check_triton_build import Case, check, table

emb = torch.empty(200, 1024, device="meta")
roots, neighbors = (torch.empty(shape, dtype=torch.int64, device="meta") for shape in ((8,), (8, 64)))
log_q0, g, kl, g_root = (torch.empty(shape, device="meta") for shape in ((8, 64), (8, 64), (8,), (8, 1024)))
# the kernel itself, as the launcher used to call it (it now sends tiles this big to the reference)
results = check([Case("k64 d1024", lambda: knn._knn_kl_fwd_kernel[(8,)](
    emb, roots, neighbors, log_q0, kl, g, g_root, 8, 64, 1024, 1024, 0.1, 1.0, ROOTS=1, BLOCK_K=64, BLOCK_D=1024,
    num_warps=8))], [90])
print(table(results))
json.dump([[r.kernel, r.stack_bytes, r.problems] for r in results], sys.stdout)
'''


@cpu_side
@needs_binder
def test_a_spilling_kernel_is_reported(tmp_path):
    """ptxas puts spilled registers in the stack frame, which cuobjdump counts as STACK, not LOCAL:
    the table said 'spill 0' for the knn forward at k 64, d 1024 (a 64 x 1024 fp32 tile in 8 warps:
    ptxas -v says 956 B of spill stores). It now shows the stack frame and a WARN line, not a failure."""
    script = tmp_path / "spill.py"
    script.write_text(SPILL)
    proc = subprocess.run([sys.executable, str(script)], env=_compile_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    *table_lines, last = proc.stdout.strip().splitlines()
    [[kernel, stack, problems]] = json.loads(last)
    assert kernel == "_knn_kl_fwd_kernel" and stack > 0 and problems == []
    assert any(line.startswith("WARN _knn_kl_fwd_kernel sm_90") and f"{stack} B stack frame" in line
               for line in table_lines), table_lines


HUGE_GRIDS = '''
import json, sys
import torch
from segpcl_fast.kernels import lora_merge, pgd_step
from segpcl_fast.kernels.check_triton_build import Case, check

meta = torch.device("meta")
x = torch.empty(1, 3, 12000, 12000, device=meta)  # 70313 pixel blocks of 2048 a plane
c = torch.empty(3, device=meta)
w, a, b = torch.empty(64, 5_000_000, device=meta), torch.empty(4, 5_000_000, device=meta), torch.empty(64, 4, device=meta)
cases = [Case("pgd", lambda: pgd_step.pgd_step_triton(x, x, x, c, c, c, c)),
         Case("merge", lambda: lora_merge.lora_merged_weight_triton(w, a, b, 2.0))]  # 78125 column blocks
json.dump([[r.case, list(r.grid), r.problems] for r in check(cases, [90])], sys.stdout)
'''


@cpu_side
@needs_binder
def test_grids_stay_within_cuda_limits_at_huge_sizes(tmp_path):
    """pgd_step's pixel blocks and lora_merge's column blocks went on grid axis 1, which CUDA stops at
    65535 (a 12000 x 12000 image; a 5M-wide weight): both launch one 1-D grid now."""
    script = tmp_path / "huge_grids.py"
    script.write_text(HUGE_GRIDS)
    proc = subprocess.run([sys.executable, str(script)], env=_compile_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {case: (grid, problems) for case, grid, problems in json.loads(proc.stdout.strip().splitlines()[-1])}
    assert rows["pgd"] == ([3 * 70313], []), rows
    assert rows["merge"] == ([1 * 78125], []), rows
