"""CI on CPU machines: the CUDA sources of segpcl_fast._C must compile (nvcc, sm_89 and sm_90).

Runs csrc/check_cuda_build.py (about 45 s on 2 cores); skipped only where there is no nvcc or
the installed torch is a CPU-only build.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CUDA_HOME = os.environ.get("CUDA_HOME") or "/usr/local/cuda"


@pytest.mark.skipif(not (Path(CUDA_HOME) / "bin" / "nvcc").is_file(), reason=f"no nvcc under {CUDA_HOME}")
@pytest.mark.skipif(torch.version.cuda is None, reason="CPU-only torch build")
def test_cuda_sources_compile_for_sm89_and_sm90(tmp_path):
    env = dict(os.environ, CUDA_HOME=CUDA_HOME)
    result = subprocess.run(
        [sys.executable, str(ROOT / "csrc" / "check_cuda_build.py"), "--archs", "8.9;9.0", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    objects = sorted(p.name for p in tmp_path.glob("*.o"))
    assert objects == ["lora_b_linear_cuda.o"]


def test_arch_flags_parse_the_arch_list():
    sys.path.insert(0, str(ROOT / "csrc"))
    from check_cuda_build import arch_flags

    assert arch_flags("8.9;9.0") == ["-gencode", "arch=compute_89,code=sm_89",
                                     "-gencode", "arch=compute_90,code=sm_90"]
    with pytest.raises(ValueError, match="no CUDA arch"):
        arch_flags(" ; ")
