"""The ahead-of-time compile check (segpcl_fast.kernels.check_triton_build): properties test_triton_build.py
leaves open (found by a mutation audit), checked without compiling a kernel except in one case:

- occupancy by hand where the register allocation unit (256 per warp), the 1 KiB system share and the
  128 B shared-memory unit change the answer, each arch's row of limits (blocks and warps per SM, the
  opt-in shared memory of one block: it fits once per SM) and launch_problems at each limit and one past it
  (shared memory per arch, a full register file, CUDA's grid on every axis);
- the patching: check() refuses while TRITON_INTERPRET=1 is set (this process); within it a launch goes to
  the Recorder with the case's name and can_run_triton takes meta tensors; JITFunction.run and
  can_run_triton are restored afterwards, also when the block raises; a launcher that raises is one
  '(launcher)' result; an arch without limits is refused before anything is patched;
- Recorder's de-duplication: one compile per (kernel, arch, specialisation, options, grid), another
  num_warps, grid, arch or alignment is another compile (_compile stubbed: the binder runs for real);
- table(): one row per distinct kernel and arch, a WARN line only for a stack frame, a FAIL line per problem
  of every result (the launcher's included), launcher failures without a row;
- main() (check stubbed): '9.0' and ';' in --archs, an empty --archs refused, -k selects (and one matching
  nothing is refused), the exit status and the JSON report's 'ok' follow the problems (a launcher's too),
  the report is replaced whole (no .tmp left); and, in a fresh process, the command line clears
  TRITON_INTERPRET=1 before triton is imported;
- default_cases(): launchers stubbed, the configurations its docstring promises (both storage dtypes of
  every op, the mixed bf16 / fp32 anchor_kl pair, both teacher forms, chunked widths and chunks of 8, the
  stride-0 incoming gradients, channels_last, the widest LoRA rank, the backward fed the forward's outputs),
  each named for the dtypes it builds.
"""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from segpcl_fast.ops._kernels import load_kernel

triton = pytest.importorskip("triton")
from triton.runtime.jit import JITFunction  # noqa: E402

check_build = load_kernel("check_triton_build")
utils = load_kernel("_triton_utils")
needs_binder = pytest.mark.skipif(check_build.binder_available() is not None,
                                  reason=f"{check_build.binder_available()}: the check cannot bind arguments")
KIB = 1024
ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- occupancy and launch limits by hand

@pytest.mark.parametrize("arch, warps, regs, shared, expected", [
    (90, 4, 33, 0, 48 / 64),       # 33 x 32 = 1056 -> 1280 a warp (unit 256; 1152 at 128): 12 warps a sub-partition
    (90, 4, 32, 76 * KIB, 8 / 64),  # 76 KiB + the 1 KiB system share: 2 blocks in 228 KiB (3 without the share)
    (89, 1, 16, 33076, 2 / 48),    # 33076 + 1024 = 34100 -> 34176 (unit 128): 2 in 100 KiB (3 unrounded)
    (90, 1, 16, 20076, 11 / 64),   # 21100 -> 21120 (unit 128): 11 blocks (10 at unit 256)
    (80, 1, 16, 0, 32 / 64),       # block-limited on every arch: its blocks per SM, over its warps per SM
    (86, 1, 16, 0, 16 / 48),
    (89, 1, 16, 0, 24 / 48),
    (90, 1, 16, 0, 32 / 64),
    (89, 0, 16, 0, 0.0),           # no warp: nothing resident (not a division by zero)
])
def test_occupancy_rounding_and_each_arch_by_hand(arch, warps, regs, shared, expected):
    assert check_build.occupancy(arch, warps, regs, shared) == pytest.approx(expected)


@pytest.mark.parametrize("arch, per_block, warps_per_sm", [(80, 163 * KIB, 64), (86, 99 * KIB, 48), (89, 99 * KIB, 48),
                                                           (90, 227 * KIB, 64)])
def test_each_arch_takes_its_opt_in_shared_memory_once_per_sm(arch, per_block, warps_per_sm):
    """The Guide's opt-in maximum per block is a launch's limit (one byte more fails) and, with the 1 KiB
    system share, exactly one such block fits an SM."""
    assert check_build.launch_problems(arch, (1,), 4, 32, per_block) == []
    assert check_build.launch_problems(arch, (1,), 4, 32, per_block + 1) == [
        f"shared memory {per_block + 1} B > {per_block} B per block on sm_{arch}"]
    assert check_build.occupancy(arch, 4, 32, per_block) == pytest.approx(4 / warps_per_sm)


def test_launch_problems_at_each_limit_and_one_past():
    assert check_build.launch_problems(90, (1,), 32, 64, 0) == []  # 64 x 1024 = the whole 64 Ki register file
    assert check_build.launch_problems(90, (1,), 32, 65, 0) == ["65 registers x 1024 threads > 65536 registers per block"]
    assert check_build.launch_problems(90, (1,), 8, 255, 0) == []  # 255 x 256 threads (32 a warp)
    assert check_build.launch_problems(90, (2**31 - 1, 65535, 65535), 4, 32, 0) == []
    assert check_build.launch_problems(90, (2**31, 65536, 65536), 4, 32, 0) == [
        "grid axis 0 = 2147483648 outside 1..2147483647", "grid axis 1 = 65536 outside 1..65535",
        "grid axis 2 = 65536 outside 1..65535"]
    assert check_build.launch_problems(90, (4, 0), 4, 32, 0) == ["grid axis 1 = 0 outside 1..65535"]


# ---------------------------------------------------------------- patching JITFunction.run

def test_check_refuses_in_an_interpreting_process():
    assert utils.interpret_mode()  # tests/conftest.py
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 is set in this process"):
        check_build.check([])
    assert utils.can_run_triton is not None and not utils.can_run_triton(torch.empty(1, device="meta"))


@needs_binder
def test_check_routes_launches_to_the_recorder_and_restores_the_patches(monkeypatch):
    monkeypatch.setattr(utils, "interpret_mode", lambda: False)  # as a fresh TRITON_INTERPRET=0 process
    launches, seen = [], []
    monkeypatch.setattr(check_build.Recorder, "launch",
                        lambda self, jit, grid, args, kwargs: launches.append((self.case, jit, grid, args, kwargs)))
    saved_run, saved_can_run = JITFunction.run, utils.can_run_triton
    meta = torch.empty(2, device="meta")

    def boom():
        raise ValueError("bad sizes")

    results = check_build.check([
        check_build.Case("probe", lambda: seen.append(utils.can_run_triton(meta))),
        check_build.Case("launch", lambda: JITFunction.run("jit", 1, meta, grid=(3,), warmup=False, num_warps=2)),
        check_build.Case("raises", boom)], archs=[90])
    assert seen == [True]
    assert launches == [("launch", "jit", (3,), (1, meta), {"num_warps": 2})]
    assert [(r.case, r.kernel, r.arch, r.problems) for r in results] == [
        ("raises", "(launcher)", 0, ["launcher raised ValueError: bad sizes"])]
    assert JITFunction.run is saved_run and utils.can_run_triton is saved_can_run
    with pytest.raises(KeyError):
        with check_build.compile_instead_of_launch([89, 90]):
            assert JITFunction.run is not saved_run and utils.can_run_triton(meta)
            raise KeyError("x")
    assert JITFunction.run is saved_run and utils.can_run_triton is saved_can_run
    with pytest.raises(ValueError, match="no SM limits for sm_75"):
        with check_build.compile_instead_of_launch([90, 75]):
            pass
    assert JITFunction.run is saved_run and utils.can_run_triton is saved_can_run


def _scale(x_ptr, n, BLOCK: "tl.constexpr"):  # noqa: F821 - bound only by the binder's signature, never compiled
    pass


@needs_binder
def test_recorder_compiles_each_distinct_launch_once(monkeypatch):
    """Triton's binder runs for real (meta tensors); _compile is stubbed. Debug (the kernel's own, or
    triton.knobs.runtime.debug) reaches the options, as a real launch's does."""
    from triton import knobs

    compiled = []
    monkeypatch.setattr(check_build, "_compile", lambda case, jit, target, grid, bound, spec, options, kwargs:
                        compiled.append((case, target.arch, grid, options.get("num_warps"), options["debug"])) or
                        check_build.Compiled(case=case, kernel="_scale", arch=target.arch, grid=grid, constexprs={}))
    jit = JITFunction(_scale)
    x = torch.empty(64, device="meta")
    recorder = check_build.Recorder([89, 90])
    recorder.case = "a"
    recorder.launch(jit, (1,), (x, 64), {"BLOCK": 64})
    recorder.launch(jit, (1,), (x, 64), {"BLOCK": 64})  # the same compile
    assert compiled == [("a", 89, (1,), None, False), ("a", 90, (1,), None, False)]
    recorder.case = "b"
    recorder.launch(jit, (2,), (x, 64), {"BLOCK": 64})  # another grid
    recorder.launch(jit, lambda meta: (4,), (x, 64), {"BLOCK": 64, "num_warps": 8})  # other warps, a callable grid
    recorder.launch(jit, (1,), (x, 64), {"BLOCK": 32})  # another constexpr
    assert compiled[2:] == [("b", 89, (2,), None, False), ("b", 90, (2,), None, False), ("b", 89, (4,), 8, False),
                            ("b", 90, (4,), 8, False), ("b", 89, (1,), None, False), ("b", 90, (1,), None, False)]
    del compiled[:]
    recorder.targets = recorder.targets[1:]
    recorder.launch(JITFunction(_scale, debug=True), (1,), (x, 64), {"BLOCK": 64})
    monkeypatch.setattr(knobs.runtime, "debug", True)
    recorder.launch(jit, (1,), (x, 64), {"BLOCK": 64})
    assert compiled == [("b", 90, (1,), None, True)] * 2
    assert len(recorder.results) == 10


@needs_binder
def test_compile_reads_the_kernels_usage_into_its_record(monkeypatch):
    """_compile with triton.compile and cuobjdump stubbed: the record takes the binder's constexprs and pointer
    types, registers / spills (LOCAL) / stack from the cubin, shared memory and warps from the metadata, the
    occupancy and launch problems of that shared memory, the SASS counts; a compile error is one problem."""
    kernel = types.SimpleNamespace(asm={"cubin": b"cubin"},
                                   metadata=types.SimpleNamespace(name="_scale_0d1", num_warps=4, shared=100 * KIB))
    monkeypatch.setattr(triton, "compile", lambda src, target, options: kernel)
    monkeypatch.setattr(check_build, "resource_usage", lambda cubin, name: {"REG": 40, "STACK": 24, "LOCAL": 8})
    listing = "\n".join(f"        /*{0x10 * i:04x}*/                   {op} ;" for i, op in
                         enumerate(["FADD R1, R1, R2", "FMUL R1, R1, R1", "@P0 BRA 0x0000", "EXIT", "BRA 0x0040"]))
    monkeypatch.setattr(check_build, "sass_listing", lambda cubin, name: listing)
    recorder = check_build.Recorder([89])
    recorder.case = "c"
    recorder.launch(JITFunction(_scale), (70000, 2), (torch.empty(64, device="meta", dtype=torch.bfloat16), 64),
                    {"BLOCK": 64})
    (r,) = recorder.results
    assert (r.case, r.kernel, r.arch, r.grid, r.constexprs, r.pointers) == ("c", "_scale", 89, (70000, 2),
                                                                            {"BLOCK": 64}, "bf16")
    assert (r.num_warps, r.registers, r.spill_bytes, r.stack_bytes, r.shared_bytes) == (4, 40, 8, 24, 100 * KIB)
    assert (r.instructions, r.loop_instructions) == (4, 3)
    assert r.occupancy == 0.0 < check_build.occupancy(89, 4, 40, 0)  # 100 KiB + 1 KiB fits no sm_89 SM
    assert r.problems == [f"shared memory {100 * KIB} B > {99 * KIB} B per block on sm_89"]

    def broken(src, target, options):
        raise ValueError("first line\nat 3:4: arange's range must be a power of 2")
    monkeypatch.setattr(triton, "compile", broken)
    recorder.launch(JITFunction(_scale), (1,), (torch.empty(64, device="meta"), 64), {"BLOCK": 64})
    assert recorder.results[-1].problems == ["does not compile: ValueError: at 3:4: arange's range must be a power of 2"]


# ---------------------------------------------------------------- the report

def _record(case, kernel, arch, stack=0, problems=(), registers=32):
    return check_build.Compiled(case=case, kernel=kernel, arch=arch, grid=(1,), constexprs={"BLOCK": 64},
                                pointers="fp32", num_warps=4, registers=registers, stack_bytes=stack,
                                problems=list(problems))


def test_table_rows_warnings_and_failures():
    results = [_record("one", "_k", 90), _record("two", "_k", 90),  # the same compile from two cases: one row
               _record("one", "_k", 89, stack=16), _record("two", "_big", 89, problems=["shared memory too big"]),
               check_build.Compiled(case="three", kernel="(launcher)", arch=0, grid=(), constexprs={},
                                    problems=["launcher raised ValueError: x"])]
    header, *lines = check_build.table(results).splitlines()
    assert header.startswith("kernel") and "occ" in header
    rows = [line for line in lines if not line.startswith(("WARN", "FAIL"))]
    assert [row.split()[:2] for row in rows] == [["_big", "sm_89"], ["_k", "sm_89"], ["_k", "sm_90"]]
    assert [line for line in lines if line.startswith("WARN")] == [
        "WARN _k sm_89 BLOCK=64: 16 B stack frame per thread (registers spilled there: a smaller tile or more warps)"]
    assert [line for line in lines if line.startswith("FAIL")] == [
        "FAIL two: _big sm_89: shared memory too big", "FAIL three: (launcher) sm_0: launcher raised ValueError: x"]


@pytest.fixture
def stub_check(monkeypatch):
    """main() with check() stubbed: returns what `outcome` holds, records the cases and archs it got."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # main clears it only in a process that has not imported triton
    calls, outcome = [], []

    def fake(cases, archs):
        calls.append(([c.name for c in cases], list(archs)))
        return list(outcome)
    monkeypatch.setattr(check_build, "check", fake)
    return calls, outcome


@needs_binder
def test_main_selects_cases_and_reads_archs(stub_check, capsys):
    calls, outcome = stub_check
    outcome.append(_record("x", "_k", 90))
    assert check_build.main(["--archs", "8.9; 9.0", "-k", "pgd_step 64x3x224x224 fp32"]) == 0
    names, archs = calls[-1]
    assert archs == [89, 90] and names == ["pgd_step 64x3x224x224 fp32", "pgd_step 64x3x224x224 fp32 channels_last"]
    assert check_build.main([]) == 0
    assert calls[-1][1] == [89, 90] and len(calls[-1][0]) == len(check_build.default_cases())
    for argv, message in ((["--archs", " , "], "is not a list of compute capabilities"),
                          (["--archs", "sm90"], "is not a list of compute capabilities"),
                          (["-k", "no such case"], "matches no case")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            check_build.main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err, argv
    assert len(calls) == 2


@needs_binder
def test_main_exit_status_and_json_follow_the_problems(stub_check, tmp_path, capsys):
    _, outcome = stub_check
    report = tmp_path / "report.json"
    outcome.append(_record("x", "_k", 90))
    assert check_build.main(["--archs", "90", "-k", "lora_fused", "--json", str(report)]) == 0
    assert "all compile and fit" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["ok"] is True and data["archs"] == [90] and [k["kernel"] for k in data["kernels"]] == ["_k"]
    assert data["triton"] == triton.__version__
    for failing in (_record("y", "_k", 90, problems=["does not compile: x"]),
                    check_build.Compiled(case="z", kernel="(launcher)", arch=0, grid=(), constexprs={},
                                         problems=["launcher raised ValueError: x"])):
        outcome[1:] = [failing]
        assert check_build.main(["--archs", "90", "-k", "lora_fused", "--json", str(report)]) == 1
        out = capsys.readouterr().out
        assert "1 FAILED" in out and out.count("\nFAIL ") == 1, out
        data = json.loads(report.read_text())
        assert data["ok"] is False and len(data["kernels"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # written to .tmp, then replaced


@needs_binder
def test_command_line_clears_an_interpreting_environment():
    """`python -m ...check_triton_build` in a shell that exported TRITON_INTERPRET=1 (a test session's) still
    compiles: main clears it before anything imports triton (check() is stubbed: no compile)."""
    script = ("import os, sys\n"
              "from segpcl_fast.kernels import check_triton_build as c\n"
              "assert 'triton' not in sys.modules\n"
              "c.check = lambda cases, archs: print('INTERPRET', os.environ['TRITON_INTERPRET'], len(cases)) or []\n"
              "sys.exit(c.main(['--archs', '90', '-k', 'lora_merged_weight 768x768']))\n")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "INTERPRET 0 2" in proc.stdout


# ---------------------------------------------------------------- the cases

def _stub_launchers(monkeypatch):
    calls = []
    modules = {name: load_kernel(name) for name in ("pgd_step", "anchor_kl", "knn_subgraph_kl", "lora_merge",
                                                    "lora_fused")}
    current = {"case": None}

    def stub(op, result=None):
        def run(*args, **kwargs):
            calls.append((current["case"], op, args, kwargs))
            return result(*args) if result else None
        return run
    meta = torch.device("meta")
    monkeypatch.setattr(modules["pgd_step"], "pgd_step_triton", stub("pgd"))
    monkeypatch.setattr(modules["anchor_kl"], "anchor_kl_triton", stub("akl"))
    monkeypatch.setattr(modules["anchor_kl"], "anchor_kl_scale_grad_triton", stub("akl_scale"))
    monkeypatch.setattr(modules["knn_subgraph_kl"], "knn_kl_forward_triton", stub(
        "knn_fwd", lambda emb, roots, nb, ref, tau: (torch.empty(roots.shape[0], device=meta), "g", "g_root")))
    monkeypatch.setattr(modules["knn_subgraph_kl"], "knn_kl_backward_triton", stub("knn_bwd"))
    monkeypatch.setattr(modules["lora_merge"], "lora_merged_weight_triton", stub("merge"))
    monkeypatch.setattr(modules["lora_fused"], "lora_fused_forward", stub(
        "fused_fwd", lambda x, w, bias, a, b, s: ("y", "u-of-" + str(id(x)), "merged-of-" + str(id(w)))))
    monkeypatch.setattr(modules["lora_fused"], "lora_fused_backward", stub("fused_bwd"))
    cases = check_build.default_cases()
    for case in cases:
        current["case"] = case.name
        case.run()
    return cases, calls


def test_default_cases_cover_what_they_promise(monkeypatch):
    cases, calls = _stub_launchers(monkeypatch)
    _name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    assert len({c.name for c in cases}) == len(cases)
    by_op = {}
    for case, op, args, kwargs in calls:
        by_op.setdefault(op, []).append((case, args, kwargs))
        for i, t in enumerate(args):  # every case is named for the storage dtypes it builds (knn's fp32 reference aside)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 1 and (op, i) != ("knn_fwd", 3):
                assert _name[t.dtype] in case, (case, t.dtype)
    assert {op for _, op, _, _ in calls} == {"pgd", "akl", "akl_scale", "knn_fwd", "knn_bwd", "merge", "fused_fwd",
                                             "fused_bwd"}
    assert {(a[0].dtype, a[0].stride(1) == 1) for _, a, _ in by_op["pgd"]} == {(dt, cl) for dt in (torch.float32, torch.bfloat16) for cl in (False, True)}
    akl_mod = load_kernel("anchor_kl")
    akl = [(a[0].shape[1], a[0].dtype, a[1].dtype, a[3], kw.get("chunk_cols")) for _, a, kw in by_op["akl"]]
    assert {(s, t) for _, s, t, _, _ in akl} == {(torch.float32,) * 2, (torch.bfloat16,) * 2,
                                                 (torch.bfloat16, torch.float32)}
    assert {lp for *_, lp, _ in akl} == {False, True}
    widths = {w for w, *_ in akl}
    assert akl_mod.SINGLE_BLOCK_COLS in widths and max(widths) > akl_mod.SINGLE_BLOCK_COLS  # one-tile and chunked
    assert [c for *_, c in akl if c is not None] == [8]
    assert {a[1].stride() for _, a, _ in by_op["akl_scale"]} == {(0,), (1,)}
    assert sorted(a[0].stride() for _, a, _ in by_op["knn_bwd"]).count((0,)) == 1
    assert {a[0].dtype for _, a, _ in by_op["knn_fwd"]} == {torch.float32, torch.bfloat16}
    merges = {(tuple(a[0].shape), a[1].shape[0], a[0].dtype) for _, a, _ in by_op["merge"]}
    assert merges == {(s, r, dt) for s, r in (((3072, 768), 32), ((768, 768), 8), ((768, 3072), 128))
                      for dt in (torch.float32, torch.bfloat16)}
    fused = load_kernel("lora_fused")
    fwd = {case: a for case, a, _ in by_op["fused_fwd"]}
    assert {a[0].dtype for a in fwd.values()} == {torch.bfloat16, torch.float16}
    assert max(a[3].shape[0] for a in fwd.values()) == fused.MAX_RANK
    for case, a, _ in by_op["fused_bwd"]:  # the backward gets the forward's u and merged weight, g of y's shape
        x, w = fwd[case][0], fwd[case][1]
        assert (a[1], a[2]) == ("u-of-" + str(id(x)), "merged-of-" + str(id(w)))
        assert a[0].shape == (x.shape[0], w.shape[0]) and a[0].dtype == x.dtype and a[3] is fwd[case][4]
