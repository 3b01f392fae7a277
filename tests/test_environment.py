"""`segpcl-fast env`: the op paths it reports are the ones the ops take when called.

In-process tests use op_paths() only: environment() imports triton to check it imports, and an
import before tests/kernels/ sets TRITON_INTERPRET would keep Triton out of interpreter mode
for the rest of the session; the full report runs in a subprocess.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from segpcl_fast import ops
from segpcl_fast.ops import dispatch
from segpcl_fast.ops._ext import has_kernel
from segpcl_fast.ops.lora_linear import extension_status
from segpcl_fast.report.environment import format_environment, op_paths


def _run_every_op(device: str = "cpu") -> dict:
    """Call each op once on small tensors; {report row: implementation dispatch recorded}."""
    ran = {}

    def last(op, fn):
        try:
            fn()
        except RuntimeError as exc:
            return f"error: {exc}"
        return dispatch.last_choice()[op]

    x = torch.randn(2, 3, 4, 4, device=device)
    ran["pgd_step"] = last("pgd_step", lambda: ops.pgd_step(x, torch.randn_like(x), x.clone(), 0.1, 0.2, -1.0, 1.0))
    z = torch.randn(3, 5, device=device, requires_grad=True)
    ran["anchor_kl"] = last("anchor_kl", lambda: ops.anchor_kl(z, torch.randn(3, 5, device=device), 2.0))
    emb = torch.nn.functional.normalize(torch.randn(6, 8, device=device), dim=-1).requires_grad_()
    roots = torch.tensor([0, 1], device=device)
    neighbors = torch.tensor([[2, 3], [4, 5]], device=device)
    ref = torch.log_softmax(torch.randn(2, 2, device=device), dim=-1)
    ran["knn_subgraph_kl"] = last("knn_subgraph_kl", lambda: ops.knn_subgraph_kl(emb, roots, neighbors, ref, 0.5))
    xin, w, a = torch.randn(2, 8, device=device), torch.randn(6, 8, device=device), torch.randn(2, 8, device=device)
    b = torch.zeros(6, 2, device=device, requires_grad=True)
    ran["lora_b_linear"] = last("lora_b_linear", lambda: ops.lora_b_linear(xin, w, None, a, b, 2.0))
    ran["lora_b_linear (B frozen)"] = last("lora_b_linear", lambda: ops.lora_b_linear(xin, w, None, a, b.detach(), 2.0))
    q = torch.randn(1, 2, 3, 4, device=device)
    ran["attention (no mask)"] = last("attention", lambda: ops.attention(q, q, q))
    mask = torch.zeros(3, 3, device=device)
    ran["attention (masked)"] = last("attention", lambda: ops.attention(q, q, q, mask))
    return ran


@pytest.mark.parametrize("backend", ["auto", "reference", "cpp", "triton"])
def test_reported_paths_are_the_paths_calls_take(backend, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # "triton" on CPU: an error, reported as one
    with ops.backend(backend):
        reported = op_paths("cpu")
        ran = _run_every_op("cpu")
    for row, impl in ran.items():
        assert reported[row] == impl, (backend, row)
    assert set(reported) == set(ran) | {"lora_b_linear (compiled)"}
    if backend == "reference":
        assert set(reported.values()) == {"reference", "sdpa"}
    if backend == "triton":  # the CPU without the interpreter: the error the call raises
        assert reported["anchor_kl"].startswith("error: ") and "TRITON_INTERPRET" in reported["anchor_kl"]


def test_compiled_lora_row_follows_SEGPCL_LORA_COMPILE(monkeypatch):
    if not extension_status()["built"]:
        pytest.skip("segpcl_fast._C not built: compiled graphs run merged whatever the variable says")
    assert op_paths("cpu")["lora_b_linear (compiled)"] == "merged"
    monkeypatch.setenv("SEGPCL_LORA_COMPILE", "cpp")
    assert op_paths("cpu")["lora_b_linear (compiled)"] == "cpp"
    with ops.backend("reference"):
        assert op_paths("cpu")["lora_b_linear (compiled)"] == "reference"
    monkeypatch.delenv("SEGPCL_LORA_COMPILE")
    with ops.backend("cpp"):  # a forced backend holds in compiled graphs too: the variable is not read
        assert op_paths("cpu")["lora_b_linear (compiled)"] == "cpp"


def _env_cli(*args, **env):
    return subprocess.run([sys.executable, "-m", "segpcl_fast.cli", "env", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_env_cli_json_and_text():
    proc = _env_cli("--json", SEGPCL_OPS="reference", SEGPCL_LORA_COMPILE="cpp")
    assert proc.returncode == 0, proc.stderr
    env = json.loads(proc.stdout)
    assert env["ops_backend"] == "reference"
    assert env["versions"]["torch"] == torch.__version__.split("+")[0]
    assert env["extension"]["built"] == extension_status()["built"]
    assert env["cuda"]["available"] == torch.cuda.is_available()
    assert set(env["op_paths"]) == ({"cpu", "cuda"} if torch.cuda.is_available() else {"cpu"})
    assert env["op_paths"]["cpu"]["anchor_kl"] == "reference"
    assert env["environment_variables"]["SEGPCL_LORA_COMPILE"] == "cpp"
    text = format_environment(env)
    assert "op paths under ops backend 'reference'" in text and "SEGPCL_OPS=reference" in text
    for row in env["op_paths"]["cpu"]:
        assert row in text
    proc = _env_cli()
    assert proc.returncode == 0, proc.stderr
    assert "lora_b_linear (B frozen)" in proc.stdout and "triton" in proc.stdout


def test_gpu_machine_text_names_devices_and_missing_fast_paths():
    """The CUDA rendering (no GPU here): a report as a GPU machine without CUDA kernels would give."""
    from segpcl_fast.report import environment as envmod
    env = {"versions": {"segpcl_fast": "0", "python": "3.12", "torch": "2.11.0"}, "platform": "linux",
           "cpu_threads": 16,
           "cuda": {"available": True, "torch_built_with": "13.0", "torch_arch_list": ["sm_90"],
                    "devices": [{"index": 0, "name": "NVIDIA H200", "capability": "9.0", "memory_gib": 139.8,
                                 "multiprocessors": 132}]},
           "triton": {"installed": False, "version": None, "interpreter": False, "import_error": None},
           "extension": {"built": True, "cuda": False, "error": None, "path": "/x/_C.so"},
           "optional": {"apex_fused_sgd": False, "xformers": True, "scikit_learn": None, "tensorboard": None},
           "ops_backend": "auto",
           "op_paths": {"cpu": op_paths("cpu"), "cuda": {**op_paths("cpu"), "attention (no mask)": "xformers"}},
           "environment_variables": {}}
    text = envmod.format_environment(env)
    assert "cuda:0 NVIDIA H200 (sm_90, 139.8 GiB, 132 SMs)" in text
    assert "triton: not installed" in text and "no CUDA kernels" in text
    assert "hint: the Triton kernels need" in text and "SEGPCL_WITH_CUDA=1" in text
    assert ["op", "cpu", "cuda"] in [line.split() for line in text.splitlines()]  # the table's header
    row = next(line for line in text.splitlines() if line.strip().startswith("attention (no mask)"))
    assert row.split()[-2:] == ["sdpa", "xformers"]
    assert "TF32" not in text  # a report without the key (an older version's JSON): no line
    env["triton"]["installed"], env["extension"]["cuda"] = True, True
    assert "hint:" not in envmod.format_environment(env)
    env["cuda"]["matmul_tf32"] = True
    assert "fp32 matmuls: TF32 on in this process (run.tf32=true" in envmod.format_environment(env)
    env["cuda"]["matmul_tf32"] = False
    assert "fp32 matmuls: TF32 off" in envmod.format_environment(env)


def test_the_report_reads_this_processs_tf32_switch(tf32_flags):
    from segpcl_fast.report.environment import environment
    tf32_flags(matmul=True)
    assert environment()["cuda"]["matmul_tf32"] is True
    tf32_flags(matmul=False)
    assert environment()["cuda"]["matmul_tf32"] is False


def test_env_says_why_each_path_runs(monkeypatch):
    """Each row's reason comes from the dispatch's own state: the backend, the device, the extension."""
    from segpcl_fast.report.environment import op_reasons
    paths = op_paths("cpu")
    why = op_reasons("cpu", paths)
    assert set(why) == set(paths)
    assert "take CUDA tensors" in why["pgd_step"] and why["pgd_step"] == why["anchor_kl"] == why["knn_subgraph_kl"]
    if has_kernel("cpu"):
        assert paths["lora_b_linear"] == "cpp" and "the C++ op (segpcl::lora_b_linear), eager" in why["lora_b_linear"]
        assert paths["lora_b_linear (B frozen)"] == "merged" and "B needs no gradient" in why["lora_b_linear (B frozen)"]
        assert "inductor traces the plain-PyTorch merged arrangement" in why["lora_b_linear (compiled)"]
        monkeypatch.setenv("SEGPCL_LORA_COMPILE", "cpp")
        assert "SEGPCL_LORA_COMPILE=cpp" in op_reasons("cpu", op_paths("cpu"))["lora_b_linear (compiled)"]
    with ops.backend("cpp"):  # the table says cpp for every LoRA row: so does the reason (it said "one GEMM")
        forced = op_reasons("cpu", op_paths("cpu"))
        if has_kernel("cpu"):
            assert {forced[k] for k in ("lora_b_linear", "lora_b_linear (B frozen)", "lora_b_linear (compiled)")} == {
                "ops backend 'cpp' (run.ops / SEGPCL_OPS) forces the C++ op"}
        assert forced["pgd_step"].startswith("ops backend 'cpp' forces the C++ LoRA op only")
    with ops.backend("reference"):
        assert set(op_reasons("cpu", op_paths("cpu")).values()) == {
            "ops backend 'reference' (run.ops / SEGPCL_OPS): every op runs its plain-PyTorch reference"}


@pytest.mark.parametrize("fwd,bwd,shown", [
    (None, None, "fwd merged, bwd merged"), ("addmm", "split", "fwd addmm, bwd split"),
    ("bogus", None, "error: SEGPCL_LORA_FWD='bogus' is not a forward path of the C++ op; use merged, concat, addmm"),
    (None, "nope", "error: SEGPCL_LORA_BWD='nope' is not a backward path of the C++ op; use merged, split, fused"),
])
def test_env_reports_the_lora_arrangement_and_refuses_what_the_op_would(monkeypatch, fwd, bwd, shown):
    """The C++ op reads SEGPCL_LORA_FWD / _BWD per call and refuses other values at its first call:
    `env` showed `cpp` for SEGPCL_LORA_FWD=bogus, and the run then failed."""
    from segpcl_fast.report.environment import lora_arrangement
    for name, value in (("SEGPCL_LORA_FWD", fwd), ("SEGPCL_LORA_BWD", bwd)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert lora_arrangement().startswith(shown)
    if fwd == "bogus" and has_kernel("cpu"):  # the op itself agrees
        from segpcl_fast.ops.lora_linear import lora_b_linear
        x, w, a = torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8)
        b = torch.zeros(6, 2, requires_grad=True)
        with pytest.raises(RuntimeError, match="SEGPCL_LORA_FWD='bogus' is not a forward path"):
            lora_b_linear(x, w, None, a, b, 1.0)


def test_bad_SEGPCL_OPS_is_one_line():
    proc = _env_cli(SEGPCL_OPS="bogus")
    assert proc.returncode == 2
    assert proc.stderr == ("segpcl-fast: error: SEGPCL_OPS='bogus' is not an ops backend; use one of auto, reference, "
                           "triton, cpp, or unset it\n")


def test_env_reasons_under_a_forced_triton_backend_agree_with_the_table():
    """Under SEGPCL_OPS=triton the reasons described auto's rule: on the CPU an "error (below)" row read
    "auto: the Triton kernels take CUDA tensors", and a LoRA row the table showed as `triton` (the fused
    GEMMs: bf16 on CUDA, or TRITON_INTERPRET=1) read "the C++ op (segpcl::lora_b_linear), eager"."""
    from segpcl_fast.report.environment import op_reasons
    paths = {"pgd_step": "error: segpcl::pgd_step: the Triton kernel needs CUDA tensors", "anchor_kl": "triton",
             "lora_b_linear": "triton", "lora_b_linear (B frozen)": "merged", "lora_b_linear (compiled)": "triton"}
    with ops.backend("triton"):
        why = op_reasons("cpu", paths)
    assert why["pgd_step"].startswith("ops backend 'triton' (run.ops / SEGPCL_OPS) forces the kernels, which cannot run")
    assert "auto" not in why["pgd_step"].split(";")[0]
    assert why["anchor_kl"] == "ops backend 'triton' forces the kernels"
    assert why["lora_b_linear"] == why["lora_b_linear (compiled)"]
    assert why["lora_b_linear"].startswith("ops backend 'triton': the fused Triton GEMMs")
    with ops.backend("auto"):  # auto's reasons are unchanged
        assert "take CUDA tensors" in op_reasons("cpu", dict(paths, pgd_step="reference"))["pgd_step"]
