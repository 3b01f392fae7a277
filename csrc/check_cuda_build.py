"""CI check: compile the CUDA sources of segpcl_fast._C to object files, without a GPU.

    CUDA_HOME=/usr/local/cuda python csrc/check_cuda_build.py [--archs "8.9;9.0"] [--out build/cuda_check]

Runs nvcc on every *.cu in csrc/sources.txt with torch's include paths and the extension's flags,
for each arch (default: TORCH_CUDA_ARCH_LIST or "8.9;9.0", i.e. RTX 4090 and H100), then checks
with cuobjdump (the toolkit's, else the one Triton bundles) that the object holds a cubin per arch
and prints each kernel's registers, spilled, shared and stack bytes per arch. Exit status 0 only
when all of it works, so a CUDA compile error fails CI on CPU-only machines. Needs a CUDA build of
torch and nvcc.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CUDA_HOME = "/usr/local/cuda"


def cuda_home() -> Path:
    home = Path(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or DEFAULT_CUDA_HOME)
    if not (home / "bin" / "nvcc").is_file():
        raise FileNotFoundError(f"nvcc not found at {home}/bin/nvcc: set CUDA_HOME to the CUDA toolkit")
    os.environ["CUDA_HOME"] = str(home)  # before torch.utils.cpp_extension guesses it
    return home


def arch_flags(archs: str) -> list[str]:
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        num = arch.strip().removesuffix("+PTX").replace(".", "")
        if num:
            flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        if num and arch.strip().endswith("+PTX"):  # also embed PTX, as torch's arch list means
            flags += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
    if not flags:
        raise ValueError(f"no CUDA arch in '{archs}'; pass e.g. --archs '8.9;9.0'")
    return flags


def nvcc_command(home: Path, src: Path, obj: Path, archs: str) -> list[str]:
    import sysconfig

    import torch
    from torch.utils import cpp_extension

    sys.path.insert(0, str(ROOT / "csrc"))
    from csrc_build import NVCC_FLAGS

    if torch.version.cuda is None:
        raise RuntimeError("this torch is a CPU-only build; the CUDA check needs a CUDA build of torch")
    includes = [*cpp_extension.include_paths(device_type="cuda"), str(ROOT / "csrc"),
                sysconfig.get_paths()["include"]]
    return [str(home / "bin" / "nvcc"), "-c", str(src), "-o", str(obj),
            *[f"-I{p}" for p in includes], *cpp_extension.COMMON_NVCC_FLAGS, *NVCC_FLAGS,
            "-std=c++20", "--compiler-options", "-fPIC", "-DSEGPCL_WITH_CUDA=1",
            "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *arch_flags(archs)]


def find_cuobjdump(home: Path) -> Path | None:
    """The toolkit's cuobjdump, else the one Triton bundles (a toolkit may ship nvcc without it)."""
    candidates = [home / "bin" / "cuobjdump"]
    try:
        import importlib.util
        spec = importlib.util.find_spec("triton")
        if spec is not None and spec.origin:
            candidates.append(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except (ImportError, ValueError):
        pass
    return next((c for c in candidates if c.is_file()), None)


def check_cubins(cuobjdump: Path, obj: Path, archs: str) -> None:
    """A cubin per arch of `archs` (torch's arch-list syntax), and PTX for each "+PTX" one."""
    def listing(what: str) -> str:
        return subprocess.run([str(cuobjdump), what, str(obj)], capture_output=True, text=True, check=True).stdout

    cubins, ptx = listing("--list-elf"), None
    for arch in archs.replace(",", ";").split(";"):
        num = arch.strip().removesuffix("+PTX").replace(".", "")
        if num and f"sm_{num}" not in cubins:
            raise RuntimeError(f"{obj.name} has no sm_{num} cubin:\n{cubins}")
        if num and arch.strip().endswith("+PTX"):
            ptx = listing("--list-ptx") if ptx is None else ptx  # e.g. "PTX file 1: x.sm_90.ptx"
            if f"sm_{num}" not in ptx and f"compute_{num}" not in ptx:
                raise RuntimeError(f"{obj.name} has no compute_{num} PTX (arch {arch.strip()}):\n{ptx}")


def resource_usage(cuobjdump: Path, obj: Path) -> list[dict]:
    """Per kernel and arch: registers, stack, shared and local (spilled) bytes, from
    `cuobjdump -res-usage`, kernel names demangled with c++filt where it is installed."""
    out = subprocess.run([str(cuobjdump), "-res-usage", str(obj)], capture_output=True, text=True, check=True).stdout
    rows, arch = [], None
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        elif line.strip().startswith("Function ") and i + 1 < len(lines):
            usage = dict(re.findall(r"(\w+):(\d+)", lines[i + 1]))
            rows.append({"arch": arch, "kernel": line.strip()[len("Function "):].rstrip(":"),
                         **{k: int(usage.get(k, 0)) for k in ("REG", "STACK", "SHARED", "LOCAL")}})
    names = [r["kernel"] for r in rows]
    try:
        demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                                   check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        demangled = names
    for row, name in zip(rows, demangled):
        name = name.replace("(anonymous namespace)::", "").split("(")[0]  # drop the argument list
        row["kernel"] = name.removeprefix("void ")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.9;9.0")
    parser.add_argument("--out", default=str(ROOT / "build" / "cuda_check"))
    args = parser.parse_args(argv)
    home = cuda_home()
    sys.path.insert(0, str(ROOT / "csrc"))
    from csrc_build import read_sources

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cu_sources = [ROOT / s for s in read_sources(ROOT) if s.endswith(".cu")]
    for src in cu_sources:
        obj = out / (src.stem + ".o")
        start = time.perf_counter()
        result = subprocess.run(nvcc_command(home, src, obj, args.archs), capture_output=True, text=True)
        if result.returncode != 0:
            sys.stderr.write(result.stdout + result.stderr)
            sys.stderr.write(f"FAILED: nvcc {src.relative_to(ROOT)} (archs {args.archs})\n")
            return 1
        print(f"ok: {src.relative_to(ROOT)} -> {obj} (archs {args.archs}, "
              f"{time.perf_counter() - start:.1f} s)")
        cuobjdump = find_cuobjdump(home)
        if cuobjdump is None:
            print("  no cuobjdump (toolkit or triton): cubins per arch and resource usage not checked")
            continue
        check_cubins(cuobjdump, obj, args.archs)
        for row in resource_usage(cuobjdump, obj):
            print(f"  {row['arch']}: {row['kernel']}: {row['REG']} registers, {row['LOCAL']} B spilled, "
                  f"{row['SHARED']} B shared, {row['STACK']} B stack")
    return 0


if __name__ == "__main__":
    sys.exit(main())
