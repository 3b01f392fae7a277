"""Build for segpcl_fast.

The pure-Python package always installs. The C++/CUDA extension `segpcl_fast._C` is built
when torch is importable at build time (use `pip install --no-build-isolation .`); the CUDA
sources are added when a CUDA torch, a visible GPU and nvcc are present, or forced with SEGPCL_WITH_CUDA=1
(FORCE_CUDA=1 is accepted too). SEGPCL_NO_EXT=1 skips the extension entirely.
The list of sources lives in csrc/sources.txt, shared with CMakeLists.txt.
"""
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()

PACKAGES = [
    "segpcl_fast",
    "segpcl_fast.model",
    "segpcl_fast.data",
    "segpcl_fast.method",
    "segpcl_fast.engine",
    "segpcl_fast.ops",
    "segpcl_fast.report",
    "segpcl_fast.analysis",
    "segpcl_fast.kernels",
]


def _env_flag(*names):
    return any(os.environ.get(n, "0").lower() in ("1", "true", "yes", "on") for n in names)


def get_extensions():
    """Return (ext_modules, cmdclass); empty when the extension cannot or must not be built."""
    if _env_flag("SEGPCL_NO_EXT"):
        print("segpcl_fast: SEGPCL_NO_EXT=1, not building the C++ extension (the LoRA op runs in plain "
              "PyTorch)", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("segpcl_fast: torch not importable at build time; skipping the C++ extension "
              "(install with `pip install --no-build-isolation .` to build it)", file=sys.stderr)
        return [], {}
    from csrc_build import make_extension  # noqa: E402  (csrc/ build helper, see below)
    ext = make_extension(ROOT, torch, cpp_extension)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


sys.path.insert(0, str(ROOT / "csrc"))
ext_modules, cmdclass = get_extensions()

setup(
    packages=PACKAGES,
    license="Apache-2.0",  # the text: LICENSE (auto-included as License-File)
    package_data={
        "segpcl_fast": ["model_configs/*.json", "assets/*", "configs/*.yaml"],
    },
    # package_data lists every data file; include_package_data would also pull MANIFEST.in's
    # data folders in as would-be packages (setuptools warns for assets/, configs/, model_configs/)
    include_package_data=False,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
