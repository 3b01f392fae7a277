"""benchmarks/gpu_suite.sh, run for real on the CPU with a fake PYTHON: BUDGET bounds the whole call
whatever the children do, $OUT is refreshed after each step (a call SIGKILLed at the device's limit
still returns what finished), skipped.txt is this call's, STEPS="" is refused, and results.tgz keeps
the steady-state step's trace but not the big eager ViT one.

The fake PYTHON answers the quick calls (-c probes, summary scripts, `-m segpcl_fast.cli env`) at
once; every other command (pytest, setup.py, the tune / profile scripts) exits at once
(FAKE_MODE=fast), or sleeps far past the budget, ending on SIGINT (obey) or ignoring it (ignore).
Each call it gets is logged, with its pid, to FAKE_LOG; the sleeps left behind by a killed script
are ended by those pids."""
import gzip
import io
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
STEPS = ["kernels", "bench", "ext", "e2e", "profile"]

FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$$ $*" >> "$FAKE_LOG"
[ "$1" = setup.py ] && echo "CUDA_HOME=${CUDA_HOME:-}" >> "$FAKE_LOG.env"
case "$1" in
  -c) case "$2" in *open_clip*) [ -n "${FAKE_NO_OPEN_CLIP:-}" ] && exit 1;; *xdist*) [ -n "${FAKE_NO_XDIST:-}" ] && exit 1;;
      *torch.cuda.is_available*) [ -n "${FAKE_NO_CUDA:-}" ] && exit 3;;
      esac; echo "fake probe"; exit 0;;
  benchmarks/summarize_kernels.py|benchmarks/test_bench_e2e.py) echo "| fake | table |"; exit 0;;
esac
if [ "$1 $2 $3" = "-m segpcl_fast.cli env" ]; then
  if [ "${FAKE_ENV:-}" = hang ]; then trap '' INT TERM; exec sleep 120; fi
  echo "fake env"; exit 0
fi
if [ -n "${FAKE_FAST:-}" ]; then case "$*" in *"$FAKE_FAST"*) echo "fast: $*"; exit 0;; esac; fi
case "${FAKE_MODE:-fast}" in
  obey) exec sleep 120;;
  ignore) trap '' INT; exec sleep 120;;
  *) for a in "$@"; do case "$a" in --benchmark-json=*) echo '{}' > "${a#--benchmark-json=}";; esac; done
     echo "fake run: $*"; exit 0;;
esac
"""

pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("bash", "timeout", "tar", "gzip")),
                                reason="needs bash, coreutils timeout, tar and gzip")


@pytest.fixture
def suite(tmp_path):
    """suite(**env) -> (Popen, env): gpu_suite.sh started in its own session with the fake PYTHON."""
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "fake.log"
    started = []

    def start(**env):
        full = dict(os.environ, PYTHON=str(fake), FAKE_LOG=str(log), WORK=str(tmp_path / "work"),
                    OUT=str(tmp_path / "out"), KILL_GRACE="2", MIN_CMD_S="1", MIN_STEP_S="4", MIN_VARIANT_S="2",
                    MIN_COMPILED_VARIANT_S="2")
        full.update(env)
        proc = subprocess.Popen(["bash", str(SUITE)], env=full, cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        started.append(proc)
        return proc, full

    yield start
    for proc in started:  # the script itself, if a test left it running
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if log.exists():  # the fake's sleeps (timeout puts them in a process group of their own)
        for line in log.read_text().splitlines():
            pid = int(line.split()[0])
            try:
                if b"sleep" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass


def _members(tgz: Path) -> set[str]:
    with tarfile.open(tgz) as tar:
        return set(tar.getnames())


def _lines(path: Path) -> list[str]:
    return path.read_text().split()


@pytest.mark.parametrize("mode", ["obey", "ignore"])
def test_budget_bounds_the_call_whatever_the_children_do(suite, tmp_path, mode):
    # 12 s: 5 held back for the final pack, so the kernels pytest gets about 7 - 2 (kill grace) s,
    # then under MIN_STEP_S is left and the other four steps are skipped; in the ignore case the
    # children ignore SIGINT and `segpcl-fast env` ignores SIGTERM too, so both end by SIGKILL
    budget = 12
    t0 = time.monotonic()
    proc, _ = suite(STEPS=" ".join(STEPS), BUDGET=str(budget), RESERVE="5", STEP_TIMEOUT="100", FAKE_MODE=mode,
                    FAKE_ENV="hang" if mode == "ignore" else "")
    _, stderr = proc.communicate(timeout=budget + 30)
    took = time.monotonic() - t0
    assert took <= budget + 2.5, (took, stderr)
    assert proc.returncode == 1  # the kernels pytest was stopped at its limit
    out = tmp_path / "out"
    assert _lines(out / "skipped.txt") == ["bench", "ext", "e2e", "profile"]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["device.txt", "results.tgz", "skipped.txt", "summary.md"], names
    summary = (out / "summary.md").read_text()
    assert "- kernels: stopped at its limit" in summary and "skipped (budget): bench ext e2e profile" in summary
    assert {"./kernel_tests.txt", "./steps.txt", "./skipped.txt"} <= _members(out / "results.tgz")
    device = (out / "device.txt").read_text()
    assert "== segpcl-fast env ==" in device
    assert ("fake env" in device) == (mode == "obey")


def test_out_is_refreshed_after_each_step_so_a_kill_keeps_what_finished(suite, tmp_path):
    proc, env = suite(STEPS="kernels bench", FAKE_MODE="obey", FAKE_FAST="tests/kernels", STEP_TIMEOUT="100")
    log = Path(env["FAKE_LOG"])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (log.exists() and "--benchmark-only" in log.read_text()):
        time.sleep(0.1)
    assert proc.poll() is None and "--benchmark-only" in log.read_text()  # the bench step's pytest runs
    os.killpg(proc.pid, signal.SIGKILL)  # as the device does at its limit: no trap runs
    proc.wait()
    out = tmp_path / "out"
    assert not list(out.glob(".*.tmp"))
    assert "./kernel_tests.txt" in _members(out / "results.tgz")
    assert "fast: -m pytest tests/kernels" in (tmp_path / "work" / "kernel_tests.txt").read_text()
    assert "- kernels: exit 0" in (out / "summary.md").read_text()
    assert "fake probe" in (out / "device.txt").read_text()
    assert _lines(out / "skipped.txt") == []


@pytest.mark.parametrize("steps", ["", "  "])
def test_explicitly_empty_steps_is_refused(suite, tmp_path, steps):
    proc, _ = suite(STEPS=steps)
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert "STEPS is set but empty" in stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_traces_stale_skipped_and_the_bench_step(suite, tmp_path):
    work = tmp_path / "work"
    (work / "profile_e2e_step").mkdir(parents=True)
    (work / "profile_vitb16").mkdir()
    (work / "profile_e2e_step" / "trace.json.gz").write_bytes(b"steady-state trace")
    (work / "profile_vitb16" / "trace.json").write_text('{"traceEvents": []}')
    (work / "profile_vitb16" / "top_ops.txt").write_text("top ops")
    (work / "skipped.txt").write_text("bench\nprofile\n")  # an earlier call's
    proc, env = suite(STEPS="kernels bench", BUDGET="0")
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    out = tmp_path / "out"
    assert _lines(out / "skipped.txt") == []
    members = _members(out / "results.tgz")
    assert {"./profile_e2e_step/trace.json.gz", "./profile_vitb16/top_ops.txt", "./notes.txt"} - members \
        == {"./notes.txt"}
    assert "./profile_vitb16/trace.json" not in members and "./trace.json.gz" not in members
    assert gzip.decompress((out / "trace.json.gz").read_bytes()) == b'{"traceEvents": []}'
    assert (out / "device.txt").read_text().rstrip().endswith("fake env")
    bench = [line for line in Path(env["FAKE_LOG"]).read_text().splitlines() if "--benchmark-only" in line]
    assert len(bench) == 1 and "--ignore=benchmarks/test_bench_transforms.py" in bench[0]
    assert "| fake | table |" in (out / "summary.md").read_text()


def test_results_over_16_mib_are_rebuilt_without_any_trace(suite, tmp_path):
    work = tmp_path / "work"
    (work / "profile_e2e_step").mkdir(parents=True)
    (work / "profile_e2e_step" / "trace.json.gz").write_bytes(os.urandom(16 * 2 ** 20 + 2 ** 16))
    proc, _ = suite(STEPS="kernels", BUDGET="0")
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    tgz = tmp_path / "out" / "results.tgz"
    assert tgz.stat().st_size < 2 ** 20
    with tarfile.open(tgz) as tar:
        assert "./profile_e2e_step/trace.json.gz" not in tar.getnames()
        notes = io.TextIOWrapper(tar.extractfile("./notes.txt")).read()
    assert "rebuilt without any trace" in notes and notes.count("\n") == 1


def _commands(env) -> list[str]:
    """The fake PYTHON's calls that are step commands (not probes, summaries or env)."""
    lines = [line.split(" ", 1)[1] for line in Path(env["FAKE_LOG"]).read_text().splitlines()]
    return [c for c in lines if not c.startswith("-c ") and "summarize_kernels" not in c and "segpcl_fast.cli env" not in c
            and not c.startswith("benchmarks/test_bench_e2e.py")]


def test_all_steps_in_order_main_e2e_variants_before_the_profile_extra_after(suite, tmp_path):
    proc, env = suite(BUDGET="0")
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    commands = _commands(env)
    e2e = [c.split("-k cuda and ")[1].split()[0] for c in commands if "-k cuda and " in c]
    assert e2e == ["compiled_fused", "cudagraphs_fused", "compiled_reference", "eager_fused", "bf16text_fused",
                   "bf16text_cudagraphs", "compiled_triton", "compiled_cpp_lora", "eager_reference", "autotune_fused",
                   "autotune_cudagraphs", "staticbatch_fused", "percallcast_fused", "eagerloss_fused",
                   "cppwrapper_fused", "unbatchedmerge_fused", "tf32_fused", "tf32_cudagraphs", "fp16_fused"]
    order = [next(i for i, c in enumerate(commands) if key in c) for key in
             ("tests/kernels", "--benchmark-only -q -p no:cacheprovider --ignore", "tune_kernels_cuda",
              "tune_kernels_cuda.py knn", "setup.py",
              "and compiled_fused", "and eager_fused", "profile_e2e_step", "segpcl_fast.cli profile",
              "and compiled_cpp_lora")]
    assert order == sorted(order), commands
    bench = next(c for c in commands if "--ignore=benchmarks/test_bench_e2e.py" in c)
    assert "--ignore=benchmarks/test_bench_lora_linear.py" in bench  # the ext step runs those, with the extension
    assert sum("test_bench_lora_linear.py" in c and "--ignore" not in c for c in commands) == 1


def test_a_step_part_runs_alone_as_skipped_txt_names_it(suite, tmp_path):
    proc, env = suite(STEPS="e2e-eager_reference bench-tune profile-vitb16", BUDGET="0")
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    commands = _commands(env)
    assert len(commands) == 3, commands
    assert "tune_kernels_cuda.py" in commands[0] and "-k cuda and eager_reference" in commands[1]
    assert "segpcl_fast.cli profile" in commands[2]
    Path(env["FAKE_LOG"]).write_text("")
    proc, env = suite(STEPS="kernels bench-pytest ext", BUDGET="0")  # the benchmarks without the knob sweeps
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    commands = _commands(env)
    assert [c.split()[0] for c in commands] == ["-m", "-m", "setup.py", "-m", "-m", "benchmarks/lora_parts_cuda.py"]
    assert "tests/kernels" in commands[0] and "--benchmark-only" in commands[1] and "tune_kernels" not in " ".join(commands)
    assert "- bench-pytest: exit 0" in (tmp_path / "out" / "summary.md").read_text()
    for wrong in ("benchmark", "bench-knobs", "e2e-eager"):  # a typo runs nothing and says so
        proc, _ = suite(STEPS=f"e2e-eager_reference {wrong}")
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 2 and f"unknown step '{wrong}'" in stderr


def test_summaries_alone_and_no_main_e2e_variants(suite, tmp_path):
    proc, env = suite(STEPS="bench-summary e2e-summary", BUDGET="0")
    _, stderr = proc.communicate(timeout=60)
    assert _commands(env) == []
    calls = Path(env["FAKE_LOG"]).read_text()
    assert "summarize_kernels.py" in calls and "no e2e variant wrote its JSON" in (tmp_path / "out" / "summary.md").read_text()
    proc, env = suite(STEPS="e2e", E2E_VARIANTS="", E2E_EXTRA="eager_reference", BUDGET="0")
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr  # no summary of nothing before the later variants
    assert [c for c in _commands(env) if "-k cuda and" in c][-1].endswith("--benchmark-json=" + str(tmp_path / "work" / "bench_e2e_eager_reference.json"))


def test_without_open_clip_e2e_and_profile_are_skipped_up_front(suite, tmp_path):
    proc, env = suite(STEPS="kernels e2e profile", BUDGET="0", FAKE_NO_OPEN_CLIP="1")
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr  # a call whose chosen steps ran nothing is not a success
    commands = _commands(env)
    assert len(commands) == 1 and "tests/kernels" in commands[0]
    out = tmp_path / "out"
    assert _lines(out / "skipped.txt") == []  # not for lack of budget: another call would not run them either
    assert "open_clip is not importable" in (out / "device.txt").read_text()
    assert "step e2e skipped: open_clip is not importable" in (out / "summary.md").read_text()


def test_without_a_cuda_device_no_step_runs_and_the_call_fails_saying_so(suite, tmp_path):
    """On a machine where torch sees no GPU every step half-ran: the bench step's CUDA rows all skipped and it read
    "exit 0", the GPU probes and knob sweeps ended in tracebacks, the ext step compiled, the profile ran ViT-B/16 on
    the CPU; with a short BUDGET the call even exited 0. Now: one message, no step command, exit 2."""
    proc, env = suite(BUDGET="0", FAKE_NO_CUDA="1")
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2, stderr
    assert "no CUDA device is visible to torch here" in stderr and "pytest benchmarks/ --benchmark-only" in stderr
    assert _commands(env) == []
    out = tmp_path / "out"
    assert "no CUDA device is visible to torch here" in (out / "device.txt").read_text()
    assert "no step run: torch sees no CUDA device" in (out / "summary.md").read_text()


@pytest.mark.parametrize("nvcc_is_a_wrapper", [False, True])
def test_the_extension_builds_with_the_toolkit_of_nvcc(suite, tmp_path, nvcc_is_a_wrapper):
    """CUDA_HOME is the folder above nvcc's bin/; an nvcc wrapper script (/usr/local/bin/nvcc ->
    exec /usr/local/cuda-13.0/bin/nvcc) has no toolkit there, and the build then takes /usr/local/cuda."""
    toolkit = tmp_path / "cuda-x"
    (toolkit / "bin").mkdir(parents=True)
    if not nvcc_is_a_wrapper:
        (toolkit / "include").mkdir()
        (toolkit / "include" / "cuda_runtime.h").write_text("")
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (toolkit / "bin" / "nvcc").chmod(0o755)
    proc, fake_env = suite(STEPS="ext", PATH=f"{toolkit / 'bin'}:{os.environ['PATH']}", CUDA_HOME="")  # "": unset
    proc.communicate(timeout=60)
    seen = Path(fake_env["FAKE_LOG"] + ".env").read_text().split()
    if nvcc_is_a_wrapper and not Path("/usr/local/cuda/include/cuda_runtime.h").is_file():
        assert seen == [f"CUDA_HOME={toolkit}"]  # nothing better to take
    else:
        assert seen == ["CUDA_HOME=/usr/local/cuda" if nvcc_is_a_wrapper else f"CUDA_HOME={toolkit}"]


@pytest.mark.parametrize("env, workers", [({}, "-n 8"), ({"KERNEL_WORKERS": "3"}, "-n 3"),
                                          ({"KERNEL_WORKERS": "1"}, None), ({"FAKE_NO_XDIST": "1"}, None)])
def test_kernel_tests_run_in_xdist_workers_where_xdist_imports(suite, tmp_path, env, workers):
    """The kernels step's pytest gets -n KERNEL_WORKERS (default 8) when xdist imports, and runs in one
    process when it does not or KERNEL_WORKERS=1; either way it is the one kernels command."""
    proc, _ = suite(STEPS="kernels", **env)
    proc.communicate(timeout=120)
    runs = [line for line in (tmp_path / "fake.log").read_text().splitlines() if "-m pytest tests/kernels" in line]
    assert len(runs) == 1
    assert (" -n " in runs[0]) == (workers is not None) and (workers is None or workers + " " in runs[0])


@pytest.mark.parametrize("value", ["auto", "0", "-2"])
def test_kernel_workers_must_be_a_count(suite, value):
    """KERNEL_WORKERS=auto (an xdist value) made `[ -gt ]` fail and the tests run in one process without a word."""
    proc, _ = suite(STEPS="kernels", KERNEL_WORKERS=value)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "KERNEL_WORKERS must be a whole number of processes >= 1" in err


def test_no_e2e_variant_name_contains_another():
    """gpu_suite.sh picks each variant with pytest -k "cuda and NAME": a name inside another
    (bf16text_fused in a cudagraphs_bf16text_fused, say) would run both under one step."""
    source = Path(__file__).resolve().parents[1] / "benchmarks" / "test_bench_e2e.py"
    names = re.findall(r'^    "(\w+)": \(', source.read_text(), flags=re.M)
    assert len(names) >= 9
    clashes = [(a, b) for a in names for b in names if a != b and a in b]
    assert clashes == []


def test_a_compiled_e2e_variant_needs_more_budget_than_an_eager_one(suite, tmp_path):
    """A compiled variant builds and compiles ViT-B/16 before its first round (79-177 s on the H200):
    started with less than MIN_COMPILED_VARIANT_S it would only spend the call; an eager one still runs."""
    proc, env = suite(STEPS="e2e-compiled_fused e2e-eager_reference", BUDGET="100", RESERVE="40",
                      MIN_COMPILED_VARIANT_S="80")
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    e2e = [c for c in _commands(env) if "-k cuda and" in c]
    assert len(e2e) == 1 and "-k cuda and eager_reference" in e2e[0], e2e
    assert _lines(tmp_path / "out" / "skipped.txt") == ["e2e-compiled_fused"]
    assert "MIN_COMPILED_VARIANT_S=80" in stderr
