"""Kernel tests: Triton kernels run on CPU tensors through Triton's interpreter.

TRITON_INTERPRET=1 is set here, before the kernels are first launched (they are jitted lazily).
To run the CUDA variants on a GPU machine instead: `TRITON_INTERPRET=0 pytest tests/kernels`
(the CPU-interpreter variants then skip, the "cuda" ones run).
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ["TRITON_INTERPRET"].lower() in ("1", "true", "yes", "on")


def _make_triton_interpreted() -> None:
    """triton.language jits its own helpers (tl.max, tl.sum, ...) when imported, reading
    TRITON_INTERPRET then. If something imported triton earlier in this pytest process (e.g.
    torch._dynamo, from another test directory), re-import its Python modules so that the
    interpreter sees interpreted helpers; the compiled core (triton._C) is kept."""
    if "triton.language" not in sys.modules:
        return
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(sys.modules["triton.language"].standard.max, InterpretedFunction):
        return
    for name in [m for m in sys.modules if (m == "triton" or m.startswith("triton.")) and not m.startswith("triton._C")]:
        del sys.modules[name]
    import triton.language  # noqa: F401


if INTERPRET:
    _make_triton_interpreted()

import pytest  # noqa: E402
import torch  # noqa: E402

from segpcl_fast import ops  # noqa: E402


def _device_params():
    return [
        pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU Triton needs TRITON_INTERPRET=1")),
        pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
            INTERPRET or not torch.cuda.is_available(),
            reason="needs a CUDA device and TRITON_INTERPRET unset/0 (see benchmarks/gpu_suite.sh)")]),
    ]


@pytest.fixture(params=_device_params())
def device(request):
    """Where the Triton kernels run: "cpu" (interpreter) or "cuda"."""
    return request.param


@pytest.fixture
def triton_backend():
    """Force the Triton path for the duration of a test."""
    with ops.backend("triton"):
        yield


@pytest.fixture
def graph_breaks():
    """Reset dynamo state; call the returned function to read the graph-break count since."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield lambda: sum(counters["graph_break"].values())
    torch._dynamo.reset()


def _old_interpreter_numpy_bug(exc: BaseException) -> bool:
    """Triton <= 3.6's interpreter turns a loop bound read from memory or a runtime int (the chunked
    anchor_kl loop, the knn backward's per-row range) into a Python int with int(array of shape
    (1,)), which numpy >= 2.4 refuses; Triton 3.7+ squeezes first. Compiled kernels are unaffected."""
    import numpy
    import triton
    from packaging.version import Version
    if not INTERPRET or Version(triton.__version__) >= Version("3.7") or Version(numpy.__version__) < Version("2.4"):
        return False
    while exc is not None:
        if "only 0-dimensional arrays can be converted to Python scalars" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    except Exception as exc:
        if _old_interpreter_numpy_bug(exc):
            import numpy
            import triton
            pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run this kernel's runtime loop bound "
                        f"under numpy {numpy.__version__} (fixed in Triton 3.7): pip install 'numpy<2.4' or a "
                        "newer triton to run it on the CPU; the compiled CUDA kernel is unaffected")
        raise


@pytest.fixture
def kernel_launches():
    """`with kernel_launches() as ops_run:` records the names of the ops dispatched inside that launch
    a kernel on a GPU (allocations and views left out; a custom op counts once: benchmarks/
    op_host_cost.py's Launches). At the paper's sizes a fused op's time is the host's cost of its
    launches: the count is what tests can hold."""
    import contextlib
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from op_host_cost import Launches

    @contextlib.contextmanager
    def record():
        with Launches() as seen:
            yield seen.names
    return record
