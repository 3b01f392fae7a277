"""csrc/csrc_build.py's CUDA decision: the toolkit must really be there (nvcc, the runtime header,
libcudart), not just a CUDA_HOME that torch guessed from a wrapper nvcc on PATH."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "csrc"))
import csrc_build  # noqa: E402


def _toolkit(root: Path, nvcc=True, header=True, lib=True) -> Path:
    for wanted, rel in ((nvcc, "bin/nvcc"), (header, "include/cuda_runtime.h"), (lib, "lib64/libcudart.so.13")):
        if wanted:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text("")
    return root


def _torch(cuda="13.0", gpu=True):
    return SimpleNamespace(version=SimpleNamespace(cuda=cuda), __version__="2.x", cuda=SimpleNamespace(
        is_available=lambda: gpu))


@pytest.fixture(autouse=True)
def _no_switches(monkeypatch):
    for name in ("SEGPCL_WITH_CUDA", "FORCE_CUDA"):
        monkeypatch.delenv(name, raising=False)


def test_toolkit_problem_names_what_is_missing(tmp_path):
    assert csrc_build.toolkit_problem(str(_toolkit(tmp_path / "full"))) is None
    assert csrc_build.toolkit_problem(None).startswith("no CUDA toolkit found")
    problem = csrc_build.toolkit_problem(str(_toolkit(tmp_path / "wrapper", header=False, lib=False)))
    assert problem == f"CUDA_HOME={tmp_path / 'wrapper'} lacks include/cuda_runtime.h, lib64/libcudart.so"
    assert "bin/nvcc" in csrc_build.toolkit_problem(str(tmp_path / "nothing"))


def test_auto_builds_cuda_only_with_a_gpu_a_cuda_torch_and_a_whole_toolkit(tmp_path, capsys):
    full, broken = str(_toolkit(tmp_path / "full")), str(_toolkit(tmp_path / "broken", nvcc=False))
    assert csrc_build.want_cuda(_torch(), SimpleNamespace(CUDA_HOME=full))
    assert not csrc_build.want_cuda(_torch(gpu=False), SimpleNamespace(CUDA_HOME=full))
    assert not csrc_build.want_cuda(_torch(cuda=None), SimpleNamespace(CUDA_HOME=full))
    # a GPU but no usable nvcc: a CPU-only build that says why (it failed at the link before)
    assert not csrc_build.want_cuda(_torch(), SimpleNamespace(CUDA_HOME=broken))
    assert "without its CUDA kernels" in capsys.readouterr().err


def test_a_whole_toolkit_without_a_gpu_says_the_build_is_cpu_only_and_how_to_force_it(tmp_path, capsys):
    """CUDA_HOME=/usr/local/cuda (a whole toolkit) with a CUDA torch on a machine without a GPU built a CPU-only
    extension without a word: the user who set CUDA_HOME for the CUDA kernels found out at run time."""
    full = str(_toolkit(tmp_path / "full"))
    assert not csrc_build.want_cuda(_torch(gpu=False), SimpleNamespace(CUDA_HOME=full))
    err = capsys.readouterr().err
    assert "without its CUDA kernels: no GPU is visible" in err and "SEGPCL_WITH_CUDA=1" in err
    assert csrc_build.want_cuda(_torch(), SimpleNamespace(CUDA_HOME=full))  # a GPU: CUDA kernels, no note
    assert not csrc_build.want_cuda(_torch(cuda=None, gpu=False), SimpleNamespace(CUDA_HOME=full))  # no CUDA torch
    assert capsys.readouterr().err == ""


def test_forced_cuda_without_a_toolkit_fails_at_once_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGPCL_WITH_CUDA", "1")
    assert csrc_build.want_cuda(_torch(gpu=False), SimpleNamespace(CUDA_HOME=str(_toolkit(tmp_path / "full"))))
    with pytest.raises(RuntimeError, match=r"lacks lib64/libcudart.so: set CUDA_HOME to a CUDA toolkit"):
        csrc_build.want_cuda(_torch(), SimpleNamespace(CUDA_HOME=str(_toolkit(tmp_path / "nolib", lib=False))))
    with pytest.raises(RuntimeError, match=r"this torch has no CUDA"):
        csrc_build.want_cuda(_torch(cuda=None), SimpleNamespace(CUDA_HOME=str(tmp_path / "full")))
    monkeypatch.setenv("SEGPCL_WITH_CUDA", "0")
    assert not csrc_build.want_cuda(_torch(), SimpleNamespace(CUDA_HOME=str(tmp_path / "full")))


@pytest.mark.parametrize("gpu, preset, expected", [(True, None, None), (False, None, "8.9;9.0+PTX"),
                                                   (False, "8.0", "8.0"), (True, "8.6", "8.6")])
def test_arch_list_default_only_without_a_visible_gpu(gpu, preset, expected, tmp_path, monkeypatch):
    """With a GPU visible torch builds for the GPUs it sees (an A100 user got sm_89/sm_90 only, so
    the fused kernel had no image); without one (CI, images) the default list, with PTX for newer GPUs."""
    monkeypatch.setenv("SEGPCL_WITH_CUDA", "1")
    if preset is None:
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", preset)
    fake_ext = SimpleNamespace(CUDA_HOME=str(_toolkit(tmp_path / "cuda")), CUDAExtension=lambda *a, **k: ("cuda", k),
                               CppExtension=lambda *a, **k: ("cpp", k))
    kind, _ = csrc_build.make_extension(Path(__file__).resolve().parents[2], _torch(gpu=gpu), fake_ext)
    assert kind == "cuda"
    assert csrc_build.os.environ.get("TORCH_CUDA_ARCH_LIST") == expected
