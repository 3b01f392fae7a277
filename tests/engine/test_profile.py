"""`segpcl-fast profile` on CPU: trace, top-ops table, stage ranges, ncu command."""
import contextlib
import json

import pytest
import torch

from segpcl_fast.api import make_config
from segpcl_fast.engine.profile import STAGES, kernel_category, ncu_command, profile_training, stage_ranges


def _config(model_name, out, **kw):
    base = dict(model__name=model_name, model__pretrained=None, max_train_per_class=2, max_test_per_class=1,
                num_tasks=2, epochs=1, optim__batch_size=16, dpgd__k_adv=2, dpgd__k_seed=1, output_dir=str(out),
                num_threads=1)
    base.update(kw)
    return make_config(**base)


def test_a_task_shorter_than_steps_is_said(tiny_model_name, tmp_path, caplog):
    """Task 2 has 100 images, 7 batches of 16: --steps 9 profiled 7 while the header said 9, without a word."""
    with caplog.at_level("WARNING", logger="segpcl_fast.engine"):
        out = profile_training(_config(tiny_model_name, tmp_path / "unused"), tmp_path / "prof", steps=9)
    assert out["steps"] == 7
    assert "profile: task 2 has 7 training steps (its images / optim.batch_size=16 x optim.epochs=1), fewer than " \
           "--steps 9: 7 profiled" in caplog.text


def test_profile_writes_trace_table_and_every_stage(tiny_model_name, tmp_path):
    out = profile_training(_config(tiny_model_name, tmp_path / "unused"), tmp_path / "prof", steps=2)
    trace = json.loads((tmp_path / "prof" / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    expected = {"dpgd", "student_forward_losses", "image_forward", "text_forward", "losses.cls", "losses.acgd",
                "losses.gr", "backward", "optimizer", "prototypes"}
    assert expected <= names, expected - names
    assert set(out["stages"]) >= expected and set(out["stages"]) <= set(STAGES)
    assert out["stages"]["student_forward_losses"]["calls"] == 2 and out["stages"]["optimizer"]["calls"] == 2
    # nested ranges: the loss terms lie inside the student step, which is bounded by its range
    assert out["stages"]["losses.cls"]["ms"] <= out["stages"]["student_forward_losses"]["ms"]
    table = (tmp_path / "prof" / "top_ops.txt").read_text()
    assert "Self CPU" in table and out["top_kernel"] and out["top_kernel"] in table
    # ops and kernels only: a stage range is no op (its self time is Python's, its total its ops')
    assert not [name for name in STAGES if f" {name} " in table], table
    stages_text = (tmp_path / "prof" / "stages.txt").read_text()
    assert "dpgd" in stages_text and "ranges nest" in stages_text
    # the trace names itself, not the temporary file it was written to
    assert trace["traceName"] == str(tmp_path / "prof" / "trace.json")
    # the CPU self time by category: GEMMs and attention are there, and no time is counted twice
    cats = out["categories"]
    assert cats["gemm"] > 0 and cats["attention"] > 0
    wall = float((tmp_path / "prof" / "categories.txt").read_text().split("wall time of the window")[1])
    assert sum(cats.values()) <= wall * 1.02, (cats, wall)
    assert not (tmp_path / "unused").exists() or not any((tmp_path / "unused").glob("checkpoints/*"))


@pytest.mark.parametrize("name,category", [
    # kernel names seen in the H100 profile (BENCHMARKS.md) and in inductor / cuBLAS / our Triton output
    ("sm80_xmma_gemm_f32f32_f32f32_f32_tn_n_tilesize128x128x8_stage3_warpsize2x2x1_ffma_aligna4", "gemm"),
    ("cutlass_80_simt_sgemm_128x128_8x4_nn_align1", "gemm"),
    ("nvjet_tst_192x192_64x3_2x1_v_bz_coopB_TNT", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(...)", "gemm"),
    ("fmha_cutlassB_f32_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<...>)", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, "
     "cutlass::bfloat16_t>>(...)", "attention"),
    ("triton_per_fused__to_copy_add_native_layer_norm_3", "inductor fused"),
    ("triton_poi_fused_gelu_7", "inductor fused"),
    ("_anchor_kl_chunked_kernel", "segpcl triton"),
    ("_knn_kl_bwd_kernel", "segpcl triton"),
    ("_pgd_step_kernel", "segpcl triton"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, ...>(...)",
     "elementwise / reduction"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, ...>>(...)", "elementwise / reduction"),
    ("Memcpy DtoD (Device -> Device)", "copy / memset"),
    ("Memset (Device)", "copy / memset"),
    # CPU op names
    ("aten::addmm", "gemm"), ("aten::mm", "gemm"), ("segpcl::lora_b_linear_fwd", "gemm"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::copy_", "copy / memset"), ("aten::gelu", "elementwise / reduction"),
    ("autograd::engine::evaluate_function: MmBackward0", "other"),
])
def test_kernel_category(name, category):
    assert kernel_category(name) == category


def test_stage_ranges_are_removed_afterwards():
    from segpcl_fast.method import losses
    from segpcl_fast.model.clip import CLIPModel
    before = (CLIPModel.encode_image, losses.cls_loss)
    with stage_ranges():
        assert CLIPModel.encode_image is not before[0] and losses.cls_loss is not before[1]
    assert (CLIPModel.encode_image, losses.cls_loss) == before


def test_ncu_command_names_the_kernel_and_reruns_profile():
    cmd = ncu_command("void at::native::vectorized_elementwise_kernel<4, ...>(int, ...)", ["--set", "run.compile=true",
                                                                                          "--steps", "1"])
    assert cmd.startswith("ncu --profile-from-start off --kernel-name-base demangled --kernel-name "
                          "'regex:(^| )at::native::vectorized_elementwise_kernel<4, \\.\\.\\.>(\\(.*\\))?$' --launch-skip")
    # the rerun has torch.profiler off (--nvtx): ncu's CUPTI session is the only one
    assert cmd.endswith("segpcl_fast.cli profile --set run.compile=true --steps 1 --nvtx")


def test_profile_nvtx_runs_under_emit_nvtx_without_torch_profiler(tiny_model_name, tmp_path, monkeypatch):
    """--nvtx (for nsys / ncu) on a GPU, simulated on the CPU: emit_nvtx's only CUDA call is the device
    synchronize on entry and exit. It used to start torch.profiler inside emit_nvtx, which raises
    "Profiler is already enabled on this thread" (one profiler per thread) after the warm-up task."""
    import segpcl_fast.engine.profile as profile_mod
    from segpcl_fast.method import losses
    monkeypatch.setattr(profile_mod, "_is_cuda", lambda device: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    seen, window = [], []

    @contextlib.contextmanager
    def cuda_profiler_window():  # cudaProfilerStart / Stop, which need a driver
        window.append("start")
        yield
        window.append("stop")
    monkeypatch.setattr(profile_mod, "cuda_profiler_window", cuda_profiler_window)
    real = losses.cls_loss

    def cls_loss(*args, **kwargs):  # what profiler runs while the training step runs
        seen.append((torch._C._autograd._profiler_type(), list(window)))
        return real(*args, **kwargs)
    monkeypatch.setattr(losses, "cls_loss", cls_loss)
    out = profile_training(_config(tiny_model_name, tmp_path / "unused"), tmp_path / "prof", steps=2, nvtx=True)
    assert out["nvtx"] and out["task"] == 2 and out["steps"] == 2 and out["paths"] == {}
    nvtx, none = torch._C._profiler.ActiveProfilerType.NVTX, torch._C._profiler.ActiveProfilerType.NONE
    assert seen[:2] == [(none, [])] * 2  # task 1, the warm-up: no profiler, and outside ncu's / nsys's window
    # task 2: NVTX ranges, no torch.profiler (Kineto) session, inside cudaProfilerStart / Stop
    assert seen[2:] == [(nvtx, ["start"])] * 2 and window == ["start", "stop"]
    assert not (tmp_path / "prof").exists()  # the Nsight tool writes the report; nothing here
    assert not torch._C._autograd._profiler_enabled()


def test_profile_nvtx_on_cpu_is_refused(tiny_model_name, tmp_path, monkeypatch, capsys):
    """Refused before the model and data load (a ConfigError: the CLI prints one line, no traceback)."""
    from segpcl_fast.cli import main
    from segpcl_fast.config import ConfigError
    from segpcl_fast.engine import trainer as trainer_mod

    def no_trainer(*args, **kwargs):
        raise AssertionError("the Trainer was built before --nvtx was refused")
    monkeypatch.setattr(trainer_mod, "Trainer", no_trainer)
    with pytest.raises(ConfigError, match=r"--nvtx emits NVTX ranges for Nsight .* this run is on cpu: drop --nvtx"):
        profile_training(_config(tiny_model_name, tmp_path / "unused"), tmp_path / "prof", steps=1, nvtx=True)
    assert not (tmp_path / "prof").exists()
    code = main(["profile", "--nvtx", "--set", f"model.name={tiny_model_name}", "--set", "run.device=cpu",
                 "-o", str(tmp_path / "p")])
    captured = capsys.readouterr()
    assert code != 0 and "drop --nvtx" in captured.err and "Traceback" not in captured.err
    assert captured.out == ""  # no "segpcl-fast profile: ..." header before the refusal


def test_cli_profile(tiny_model_name, tmp_path, capsys, monkeypatch):
    from segpcl_fast.cli import main
    args = ["profile", "--set", f"model.name={tiny_model_name}", "--set", "model.pretrained=none",
            "--set", "data.max_train_per_class=1", "--set", "data.max_test_per_class=1", "--set", "data.num_tasks=2",
            "--set", "run.num_threads=1", "--steps", "1", "-o", str(tmp_path / "p")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "trace.json" in printed and "student_forward_losses" in printed
    assert (tmp_path / "p" / "trace.json").exists()
    # a CPU profile has no kernel for Nsight Compute: no ncu line (it named aten::addmm), the reason instead
    assert "ncu --kernel-name" not in printed and "Nsight Compute needs a CUDA kernel" in printed
    # on a GPU the printed ncu command profiles one step into its own folder, not over this one; and
    # run.output_dir from --set is where the profile goes when -o is not given
    import segpcl_fast.engine.profile as profile_mod
    real = profile_mod.profile_training
    monkeypatch.setattr(profile_mod, "profile_training", lambda *a, **k: {**real(*a, **k), "on_gpu": True})
    assert main(args[:-2] + ["--set", f"run.output_dir={tmp_path / 'q'}"]) == 0
    assert (tmp_path / "q" / "trace.json").exists()
    ncu = next(line for line in capsys.readouterr().out.splitlines() if "ncu --profile-from-start off --kernel-name" in line)
    # the rerun repeats the profiled window (same --steps), into its own folder, under --nvtx
    assert ncu.count("--steps 1") == 1 and ncu.endswith(f"-o {tmp_path / 'q'}-ncu --nvtx")


def test_e2e_step_profile_script(tmp_path):
    """benchmarks/profile_e2e_step.py on the CPU: files, and a summary whose numbers add up."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "profile_e2e_step.py"
    spec = importlib.util.spec_from_file_location("profile_e2e_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary = module.profile_step("cpu", "eager_reference", steps=1, out_dir=tmp_path / "p", warmup=1)
    assert {p.name for p in (tmp_path / "p").iterdir()} == {"top_kernels.txt", "categories.txt", "summary.json",
                                                          "trace.json.gz"}
    assert json.loads((tmp_path / "p" / "summary.json").read_text()) == summary
    cats = summary["category_ms_per_step"]
    assert cats["gemm"] > 0 and cats["attention"] > 0
    assert sum(cats.values()) <= summary["step_ms"] * 1.02
    # MFU and the GEMM + attention throughput come from the same analytic FLOPs
    assert summary["mfu_under_profiler"] == pytest.approx(
        summary["step_flops"] / (summary["step_ms"] / 1e3) / (summary["matmul_peak_tflops"] * 1e12), rel=2e-3)
    assert summary["gemm_attention_tflops"] * 1e12 > summary["step_flops"] / (summary["step_ms"] / 1e3)


def _profile_e2e_step_module():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "profile_e2e_step.py"
    spec = importlib.util.spec_from_file_location("profile_e2e_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_e2e_step_profile_script_profiles_the_variants_precision(tmp_path, monkeypatch):
    """--variant fp16_fused (SEGPCL_BENCH_PRECISION=fp16, as test_bench_e2e.py reads it) built the step in
    the setup's bf16, so its profile was compiled_fused's again; and a CUDA-only variant on the CPU profiled
    compiled_fused without a word, where the benchmark skips it."""
    module = _profile_e2e_step_module()
    for name in ("SEGPCL_BENCH_PRECISION", "SEGPCL_COMPILE_MODE"):  # restored at teardown (profile_step sets them)
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    built = {}

    class Built(Exception):
        pass

    def build_step(*args, precision, **kwargs):
        built["precision"] = precision
        raise Built
    monkeypatch.setattr(module, "build_step", build_step)
    with pytest.raises(Built):
        module.profile_step("cpu", "fp16_fused", steps=1, out_dir=tmp_path / "p")
    assert built["precision"] == "fp16"
    monkeypatch.delenv("SEGPCL_BENCH_PRECISION")
    with pytest.raises(Built):
        module.profile_step("cpu", "compiled_fused", steps=1, out_dir=tmp_path / "p")
    assert built["precision"] == "fp32"
    with pytest.raises(SystemExit):
        module.main(["--device", "cpu", "--variant", "cudagraphs_fused", "-o", str(tmp_path / "q")])
    assert not (tmp_path / "q").exists()


def test_profiled_task_is_past_the_tasks_that_compile():
    from segpcl_fast.engine.profile import profiled_task
    assert [profiled_task(n, False) for n in (1, 2, 3, 10)] == [0, 1, 1, 1]
    assert [profiled_task(n, True) for n in (1, 2, 3, 10)] == [0, 1, 2, 2]


@pytest.mark.slow
def test_a_compiled_profile_window_compiles_nothing(tiny_model_name, tmp_path):
    """Tasks 1 and 2 compile graphs (task 2: the teacher's and the batch grown by anchors); a window on
    task 2 timed mostly dynamo. Under run.compile the window is task 3, and the count proves it."""
    from segpcl_fast.engine.compiling import CompileSettings
    settings = CompileSettings(backend="aot_eager")
    torch._dynamo.reset()
    try:
        cfg = _config(tiny_model_name, tmp_path / "unused", run__compile=True, num_tasks=4)
        out = profile_training(cfg, tmp_path / "prof", steps=1, compile_settings=settings)
        assert out["task"] == 3 and out["graphs_compiled_in_window"] == 0
        # the loss terms are one compiled graph there: one range around it, none per term
        assert "losses" in out["stages"] and not {"losses.cls", "losses.acgd", "losses.gr"} & set(out["stages"])
        torch._dynamo.reset()
        cfg = _config(tiny_model_name, tmp_path / "unused2", run__compile=True, num_tasks=2)
        out = profile_training(cfg, tmp_path / "prof2", steps=1, compile_settings=settings)
        assert out["task"] == 2 and out["graphs_compiled_in_window"] > 0  # the count sees what task 2 compiles
    finally:
        torch._dynamo.reset()
