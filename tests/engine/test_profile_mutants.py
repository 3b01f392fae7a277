"""Tests added by a mutation audit of segpcl_fast/engine/profile.py: the stage / category / top-kernel
tables computed from hand-made profiler events (exact ms, shares of the wall time, which events
count on CPU and on GPU), the kernel-name categories and the ncu command, the stage ranges'
clean-up after an error, and profile_training on a one-task run (the task it profiles, the steps
that ran, the files it writes, a wall time no longer than the call, the caller's config untouched)."""
import shlex
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from segpcl_fast.api import make_config
from segpcl_fast.engine.profile import (category_table, kernel_category, ncu_command, profile_training,
                                        stage_ranges, stage_table, top_kernel)

CUDA, CPU = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU


def _event(key, cpu=0.0, device=0.0, self_cpu=0.0, self_device=0.0, count=1, device_type=CPU):
    """The FunctionEventAvg fields the tables read (times in us)."""
    return SimpleNamespace(key=key, cpu_time_total=cpu, device_time_total=device, self_cpu_time_total=self_cpu,
                           self_device_time_total=self_device, count=count, device_type=device_type)


STAGE_EVENTS = [_event("optimizer", cpu=1000.0, count=2), _event("aten::mm", cpu=9000.0),
                _event("backward", cpu=5000.0, device=2000.0, count=4), _event("dpgd", cpu=3000.0)]


def test_stage_table_cpu_exact():
    text, totals = stage_table(STAGE_EVENTS, on_gpu=False)
    assert totals == {"optimizer": {"ms": 1.0, "calls": 2}, "backward": {"ms": 5.0, "calls": 4},
                      "dpgd": {"ms": 3.0, "calls": 1}}
    assert text == "".join(line + "\n" for line in [  # rows in STAGES order, whatever the events' order
        f"{'stage (ranges nest)':<26}{'calls':>8}{'host ms':>14}{'host ms/call':>14}",
        f"{'dpgd':<26}{1:>8}{'3.00':>14}{'3.000':>14}",
        f"{'backward':<26}{4:>8}{'5.00':>14}{'1.250':>14}",
        f"{'optimizer':<26}{2:>8}{'1.00':>14}{'0.500':>14}"])


def test_stage_table_gpu_keeps_host_and_kernel_time_apart():
    """One clock per column: host time always; kernel time where the range launched kernels, '-' where it
    launched none (backward's kernels come from autograd's thread), never the host time in its place."""
    events = STAGE_EVENTS[:2] + [_event("backward", cpu=5000.0, device=0.0, count=4),
                                 _event("dpgd", cpu=3000.0, device=2500.0)]
    text, totals = stage_table(events, on_gpu=True)
    assert totals == {"optimizer": {"ms": 1.0, "calls": 2, "device_ms": None},
                      "backward": {"ms": 5.0, "calls": 4, "device_ms": None},
                      "dpgd": {"ms": 3.0, "calls": 1, "device_ms": 2.5}}
    assert text.splitlines() == [
        f"{'stage (ranges nest)':<26}{'calls':>8}{'host ms':>14}{'host ms/call':>14}{'kernel ms':>14}",
        f"{'dpgd':<26}{1:>8}{'3.00':>14}{'3.000':>14}{'2.50':>14}",
        f"{'backward':<26}{4:>8}{'5.00':>14}{'1.250':>14}{'-':>14}",
        f"{'optimizer':<26}{2:>8}{'1.00':>14}{'0.500':>14}{'-':>14}"]


def test_category_table_cpu_exact():
    events = [_event("dpgd", self_cpu=99000.0), _event("ProfilerStep#3", self_cpu=99000.0),
              _event("## forward ##", self_cpu=99000.0), _event("aten::gelu", self_cpu=1000.0),
              _event("aten::mm", self_cpu=4000.0), _event("aten::addmm", self_cpu=2000.0),
              _event("aten::copy_", self_cpu=0.0), _event("aten::_scaled_dot_product_flash_attention_for_cpu",
                                                          self_cpu=3000.0)]
    text, rows = category_table(events, on_gpu=False, wall_ms=20.0)
    assert rows == {"gemm": 6.0, "attention": 3.0, "elementwise / reduction": 1.0}
    assert list(rows) == ["gemm", "attention", "elementwise / reduction"]  # largest first
    assert text.splitlines() == [
        f"{'category':<28}{'self ms':>12}{'% of wall':>12}",
        f"{'gemm':<28}{'6.00':>12}{'30.0':>11}%",
        f"{'attention':<28}{'3.00':>12}{'15.0':>11}%",
        f"{'elementwise / reduction':<28}{'1.00':>12}{'5.0':>11}%",
        f"{'wall time of the window':<28}{'20.00':>12}"]


def test_category_table_gpu_counts_cuda_kernels_and_idle_time():
    events = [_event("sm80_xmma_gemm_f32", self_device=6000.0, device_type=CUDA),
              _event("flash_fwd_kernel", self_device=2000.0, device_type=CUDA),
              _event("aten::mm", self_cpu=50000.0, self_device=6000.0, device_type=CPU),  # the CPU op of the GEMM
              _event("backward", self_device=8000.0, device_type=CUDA)]
    text, rows = category_table(events, on_gpu=True, wall_ms=10.0)
    assert rows == {"gemm": 6.0, "attention": 2.0, "(no kernel running)": 2.0}
    assert f"{'(no kernel running)':<28}{'2.00':>12}{'20.0':>11}%" in text.splitlines()
    _, busy = category_table(events, on_gpu=True, wall_ms=5.0)  # clock skew: never a negative gap
    assert busy["(no kernel running)"] == 0.0


def test_top_kernel_cpu_and_gpu():
    cpu = [_event("ProfilerStep#1", self_cpu=1e6), _event("Optimizer.step#SGD.step", self_cpu=1e5),
           _event("enumerate(DataLoader)#_SingleProcessDataLoaderIter.__next__", self_cpu=1e5),
           _event("losses.cls", self_cpu=1e5), _event("Optimizer::step", self_cpu=1e5),  # annotations, not ops
           _event("DataLoader#iter::next", self_cpu=1e5), _event("aten::mm", self_cpu=500.0),
           _event("aten::addmm", self_cpu=800.0), _event("segpcl::lora_b_linear_fwd", self_cpu=0.0)]
    assert top_kernel(cpu, on_gpu=False) == "aten::addmm"
    gpu = [_event("aten::mm", self_device=1000.0, device_type=CPU),
           _event("backward", self_device=5000.0, device_type=CUDA),
           _event("sm80_xmma_gemm_f32", self_device=300.0, device_type=CUDA),
           _event("flash_fwd_kernel", self_device=200.0, device_type=CUDA)]
    assert top_kernel(gpu, on_gpu=True) == "sm80_xmma_gemm_f32"
    assert top_kernel([_event("aten::mm")], on_gpu=False) is None


@pytest.mark.parametrize("name,category", [
    ("aten::bmm", "gemm"), ("aten::baddbmm", "gemm"), ("aten::_addmm_activation", "gemm"),
    ("aten::convolution", "gemm"), ("aten::_convolution", "gemm"), ("mkldnn_convolution", "gemm"),
    ("cublasLt::splitKreduce_kernel", "gemm"), ("sm90_wgmma_f16_128x128", "gemm"),
    ("aten::to", "copy / memset"), ("aten::clone", "copy / memset"),
    ("Torch-Compiled Region: 0/0", "inductor fused"), ("CompiledFunction", "inductor fused"),
    ("cpp_fused_add_mul_0", "inductor fused"), ("aten::softmax", "elementwise / reduction"),
])
def test_kernel_category_more_names(name, category):
    assert kernel_category(name) == category


def test_ncu_command_exact():
    cmd = ncu_command("void my_kernel<float, 4>(Params<float, 4>)", ["--steps", "3", "-o", "out dir"], launches=40)
    assert shlex.split(cmd) == ["ncu", "--profile-from-start", "off", "--kernel-name-base", "demangled",
                                "--kernel-name", r"regex:(^| )my_kernel<float, 4>(\(.*\))?$", "--launch-skip", "10", "--launch-count", "1",
                                "--set", "full", "-f", "-o", "segpcl_kernel", sys.executable, "-m",
                                "segpcl_fast.cli", "profile", "--steps", "3", "-o", "out dir", "--nvtx"]


@pytest.mark.parametrize("launches,skip", [(1, 0), (4, 3), (11, 10), (500, 10), (None, 10)])
def test_ncu_skips_fewer_launches_than_the_kernel_has(launches, skip):
    """The rerun repeats the profiled window: a kernel launched n times there is still reached after n - 1 skips."""
    args = shlex.split(ncu_command("k", [], launches=launches))
    assert args[args.index("--launch-skip") + 1] == str(skip)


ADD = ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, "
       "std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<float>, std::array<char*, 3ul>)")
SOFTMAX = ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, "
           "at::native::(anonymous namespace)::SoftMaxForwardEpilogue>(float*, float const*, int)")
SGEMM = "void cutlass::Kernel2<cutlass_80_simt_sgemm_128x128_8x4_nn_align1>(cutlass_80_simt_sgemm_128x128_8x4_nn_align1::Params)"


@pytest.mark.parametrize("kernel,same,others", [
    # names as torch.profiler reports them on CUDA (BENCHMARKS.md's H100 profile, torch's own kernels)
    (ADD, [ADD.replace("void ", "", 1), ADD.split("(int")[0] + "(int, at::native::CUDAFunctor_add<float>, "
                                                              "std::array<char*, 3ul>)"],
     [ADD.replace("CUDAFunctor_add<float>", "CUDAFunctor_add<c10::BFloat16>"), ADD.replace("<4,", "<2,")]),
    (SOFTMAX, [SOFTMAX.replace("void ", "", 1)], [SOFTMAX.replace("SoftMaxForward<", "SoftMaxForwardSmem<"),
                                                  SOFTMAX.replace("<4, float, float, float", "<4, float, float, c10::Half")]),
    (SGEMM, [SGEMM.split("(")[0]], [SGEMM.replace("Kernel2<", "Kernel<"), SGEMM.replace("128x128_8x4", "256x128_8x4")]),
    ("_anchor_kl_chunked_kernel", [], ["_anchor_kl_chunked_kernel_v2", "my_anchor_kl_chunked_kernel",
                                        "_anchor_kl_kernel"]),
    ("triton_per_fused__to_copy_add_native_layer_norm_3", [], ["triton_per_fused__to_copy_add_native_layer_norm_31"]),
])
def test_kernel_name_regex_matches_that_kernel_only(kernel, same, others):
    """The old filter was the bare identifier (regex:vectorized_elementwise_kernel, regex:Kernel2, and an
    empty regex for the softmax): every instantiation matched, so ncu profiled whichever launched 11th."""
    import re
    from segpcl_fast.engine.profile import kernel_name_regex
    pattern = re.compile(kernel_name_regex(kernel))
    for name in [kernel] + same:
        assert pattern.search(name), (pattern.pattern, name)
    for name in others:
        assert not pattern.search(name), (pattern.pattern, name)


def test_top_kernel_on_gpu_is_never_a_copy():
    """ncu profiles kernels: a Memcpy / Memset row with the most device time is passed over."""
    gpu = [_event("Memcpy HtoD (Pageable -> Device)", self_device=9000.0, device_type=CUDA),
           _event("Memset (Device)", self_device=8000.0, device_type=CUDA),
           _event("sm80_xmma_gemm_f32", self_device=300.0, device_type=CUDA)]
    assert top_kernel(gpu, on_gpu=True) == "sm80_xmma_gemm_f32"


def test_stage_ranges_are_removed_after_an_error():
    from segpcl_fast.method import losses
    from segpcl_fast.model.clip import CLIPModel
    before = (CLIPModel.encode_image, CLIPModel.class_embeddings, losses.cls_loss, losses.acgd_loss, losses.tsgr_loss)
    with pytest.raises(KeyError):
        with stage_ranges():
            raise KeyError("step failed")
    assert (CLIPModel.encode_image, CLIPModel.class_embeddings, losses.cls_loss, losses.acgd_loss,
            losses.tsgr_loss) == before


def test_profile_training_refuses_zero_steps(tmp_path):
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        profile_training(make_config(), tmp_path, steps=0)
    assert not tmp_path.joinpath("trace.json").exists()


def test_profile_refuses_an_output_folder_it_cannot_make_before_loading(tmp_path, capsys):
    """`profile -o /proc/x` trained the warm-up tasks and then failed with the OS's bare message at the trace."""
    from segpcl_fast.cli import main
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "prof"):
        with pytest.raises(ValueError, match=r"profile's output folder: .*file.* pick another folder with -o"):
            profile_training(make_config(), out, steps=1)
    assert main(["profile", "-o", str(tmp_path / "file" / "prof")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a parent of" in err and "segpcl-fast profile:" not in err


def test_profile_one_task_run(tiny_model_name, tmp_path):
    cfg = make_config(model__name=tiny_model_name, model__pretrained=None, max_train_per_class=1, max_test_per_class=1,
                      num_tasks=1, epochs=1, optim__batch_size=64, output_dir=str(tmp_path / "run"), num_threads=1)
    want = cfg.to_dict()
    start = time.perf_counter()
    out = profile_training(cfg, tmp_path / "prof", steps=50)
    elapsed_ms = (time.perf_counter() - start) * 1e3
    assert cfg.to_dict() == want  # the caller's config is not the one the profile edits
    assert out["task"] == 1 and out["sort_by"] == "self_cpu_time_total" and out["device"] == "cpu"
    assert 1 <= out["steps"] < 50  # the steps that ran: one epoch of a small task, fewer than asked
    assert out["stages"]["optimizer"]["calls"] == out["stages"]["backward"]["calls"] == out["steps"]
    prof = tmp_path / "prof"
    assert (prof / "stages.txt").read_text() == out["stages_table"] and out["stages_table"].startswith("stage ")
    assert (prof / "categories.txt").read_text() == out["categories_table"]
    assert out["categories_table"].startswith("category ")
    wall = float(out["categories_table"].split("wall time of the window")[1])
    assert 0 < wall <= elapsed_ms
    assert sum(out["categories"].values()) <= wall * 1.02
