"""CI on CPU machines: the CUDA sources of segpcl_fast._C must compile (nvcc, sm_89 and sm_90).

Runs csrc/check_cuda_build.py (about 45 s on 2 cores); skipped only where there is no nvcc or
the installed torch is a CPU-only build. With a cuobjdump (the toolkit's or Triton's) it also
checks a cubin per arch and that no kernel spills registers.
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


@pytest.mark.slow
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
    sys.path.insert(0, str(ROOT / "csrc"))
    from check_cuda_build import find_cuobjdump
    if find_cuobjdump(Path(CUDA_HOME)) is None:
        assert "resource usage not checked" in result.stdout
        return
    # every instantiation of the CUDA kernel on both archs, read off the cubins: registers, no spills
    usage = [line.strip() for line in result.stdout.splitlines() if "lora_rank_r_grad_kernel<" in line]
    for arch in ("sm_89", "sm_90"):
        for dtype in ("c10::BFloat16", "c10::Half", "float", "double"):
            (line,) = [u for u in usage if u.startswith(f"{arch}: segpcl::lora_rank_r_grad_kernel<{dtype}>:")]
            registers = int(line.split(": ")[2].split(" registers")[0])
            assert 0 < registers <= 255 and ", 0 B spilled," in line, line


def test_arch_flags_parse_the_arch_list():
    sys.path.insert(0, str(ROOT / "csrc"))
    from check_cuda_build import arch_flags

    assert arch_flags("8.9;9.0") == ["-gencode", "arch=compute_89,code=sm_89",
                                     "-gencode", "arch=compute_90,code=sm_90"]
    assert arch_flags("9.0+PTX") == ["-gencode", "arch=compute_90,code=sm_90",
                                     "-gencode", "arch=compute_90,code=compute_90"]
    with pytest.raises(ValueError, match="no CUDA arch"):
        arch_flags(" ; ")


def test_cubin_check_reads_the_arch_list_as_torch_writes_it(monkeypatch, tmp_path):
    """"9.0+PTX" (csrc_build's default list ends so) asks for an sm_90 cubin and compute_90 PTX: the check
    looked for an 'sm_90+PTX' cubin and failed after the whole compile."""
    sys.path.insert(0, str(ROOT / "csrc"))
    import check_cuda_build

    listings = {"--list-elf": "ELF file    1: x.1.sm_89.cubin\nELF file    2: x.2.sm_90.cubin\n",
                "--list-ptx": "PTX file    1: x.1.sm_90.ptx\n"}
    monkeypatch.setattr(check_cuda_build.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, stdout=listings[cmd[1]]))
    obj = tmp_path / "x.o"
    check_cuda_build.check_cubins(Path("cuobjdump"), obj, "8.9;9.0+PTX")
    with pytest.raises(RuntimeError, match="no compute_89 PTX"):
        check_cuda_build.check_cubins(Path("cuobjdump"), obj, "8.9+PTX;9.0")
    with pytest.raises(RuntimeError, match="no sm_80 cubin"):
        check_cuda_build.check_cubins(Path("cuobjdump"), obj, "8.0;9.0")
