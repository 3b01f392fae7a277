"""Build description of the segpcl_fast._C extension, used by setup.py (and check_cuda_build.py).

Switches (environment):
  SEGPCL_WITH_CUDA=1 or FORCE_CUDA=1   add the CUDA sources even without a visible GPU (needs nvcc:
                                       CUDA_HOME, e.g. /usr/local/cuda, and a CUDA build of torch)
  SEGPCL_WITH_CUDA=0                   CPU-only build even where a GPU is visible
  (unset)                              CUDA sources when torch sees a GPU and nvcc is found
  TORCH_CUDA_ARCH_LIST                 GPU archs; unset: the visible GPUs' archs (torch's own rule), or
                                       "8.9;9.0+PTX" (RTX 4090, H100, PTX for newer GPUs) when none is visible
  SEGPCL_NO_EXT=1                      (setup.py) skip the extension entirely
The source list is csrc/sources.txt, shared with CMakeLists.txt.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

EXT_NAME = "segpcl_fast._C"
DEFAULT_CUDA_ARCHS = "8.9;9.0+PTX"  # for builds without a visible GPU (CI, images)
# the C++ standard comes from torch.utils.cpp_extension (C++20 for torch >= 2.10); -g0 undoes the -g of
# Python's own CFLAGS (a 14 MB .so instead of ~0.3 MB; SEGPCL_DEBUG_SYMBOLS=1 keeps them)
CXX_FLAGS = ["-O3"] + ([] if os.environ.get("SEGPCL_DEBUG_SYMBOLS") == "1" else ["-g0"])
NVCC_FLAGS = ["-O3", "-lineinfo"]


def read_sources(root: Path) -> list[str]:
    """Paths (relative to root) listed in csrc/sources.txt, comments and blank lines skipped."""
    lines = (root / "csrc" / "sources.txt").read_text().splitlines()
    sources = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    missing = [s for s in sources if not (root / s).is_file()]
    if missing:
        raise FileNotFoundError(f"csrc/sources.txt lists missing files: {missing}")
    return sources


def _flag(name: str) -> str | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return "1" if value.lower() in ("1", "true", "yes", "on") else "0"


def toolkit_problem(cuda_home: str | None) -> str | None:
    """Why `cuda_home` is no CUDA toolkit to build with (None: nvcc, the runtime header and libcudart
    are there). torch guesses CUDA_HOME from the nvcc on PATH, which can be a wrapper outside one."""
    if cuda_home is None:
        return "no CUDA toolkit found (CUDA_HOME unset and no nvcc on PATH)"
    home = Path(cuda_home)
    wanted = {"bin/nvcc": home / "bin" / "nvcc", "include/cuda_runtime.h": home / "include" / "cuda_runtime.h"}
    missing = [name for name, path in wanted.items() if not path.is_file()]
    if not any(any((home / lib).glob("libcudart.so*")) for lib in ("lib64", "lib", "targets/x86_64-linux/lib")):
        missing.append("lib64/libcudart.so")
    return f"CUDA_HOME={cuda_home} lacks {', '.join(missing)}" if missing else None


def want_cuda(torch, cpp_extension) -> bool:
    """Whether to compile the CUDA sources; raises when forced on but impossible."""
    forced = _flag("SEGPCL_WITH_CUDA") or _flag("FORCE_CUDA")
    if forced == "0":
        return False
    problem = toolkit_problem(cpp_extension.CUDA_HOME)
    if torch.version.cuda is None:
        problem = f"this torch has no CUDA (torch.version.cuda is None, torch {torch.__version__})"
    if forced == "1":
        if problem:
            raise RuntimeError(f"SEGPCL_WITH_CUDA/FORCE_CUDA=1, but {problem}: set CUDA_HOME to a CUDA toolkit "
                               "(e.g. /usr/local/cuda) and use a CUDA build of torch, or drop the switch for a "
                               "CPU-only build")
        return True
    if problem and torch.cuda.is_available():
        print(f"segpcl_fast: building the C++ extension without its CUDA kernels: {problem} (set CUDA_HOME "
              "to a CUDA toolkit to build them)", file=sys.stderr)
    elif problem is None and not torch.cuda.is_available():  # a whole toolkit, a CUDA torch: no GPU is the one reason
        print(f"segpcl_fast: building the C++ extension without its CUDA kernels: no GPU is visible (the toolkit "
              f"at CUDA_HOME={cpp_extension.CUDA_HOME} is whole); set SEGPCL_WITH_CUDA=1 to compile them without a "
              "GPU (for an image or another machine)", file=sys.stderr)
    return problem is None and torch.cuda.is_available()


def make_extension(root: Path, torch, cpp_extension):
    """The CppExtension / CUDAExtension named segpcl_fast._C, from csrc/sources.txt."""
    root = Path(root)
    sources = read_sources(root)
    with_cuda = want_cuda(torch, cpp_extension)
    if not with_cuda:
        sources = [s for s in sources if not s.endswith(".cu")]
        return cpp_extension.CppExtension(
            EXT_NAME, sources=sources, include_dirs=[str(root / "csrc")],
            extra_compile_args={"cxx": CXX_FLAGS})
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS  # with a GPU, torch builds for the GPUs it sees
    return cpp_extension.CUDAExtension(
        EXT_NAME, sources=sources, include_dirs=[str(root / "csrc")],
        define_macros=[("SEGPCL_WITH_CUDA", "1")],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS})
