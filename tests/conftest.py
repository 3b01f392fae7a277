import json
import os
from pathlib import Path

import pytest
import torch

# Subprocesses the tests start (the CLI, torchrun's ranks, probes) import segpcl_fast from this
# checkout, as the tests themselves do: not from an install elsewhere (a stale non-editable copy,
# or an editable install whose source folder has moved), which would test other code.
ROOT = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true",
                     help="also run the tests marked slow (over ~30 s each on 2 CPU cores): the whole suite, what CI runs")


def pytest_collection_modifyitems(config, items):
    """Without --runslow, the tests marked slow skip, saying how to run them: the default suite stays within
    ~15 minutes on 2 CPU cores; CI (.ci/run) runs the whole suite."""
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="marked slow (over ~30 s on 2 CPU cores): run with --runslow, as CI does")
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(skip)


TEST_TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_model_name(tmp_path_factory):
    """Register a 2-layer open_clip config 'test-tiny' (random weights) and return its name. Without open_clip
    (a GPU machine whose wheels were not carried: gpu_suite.sh's ext step) the tests using it skip."""
    open_clip = pytest.importorskip("open_clip")
    d = tmp_path_factory.mktemp("model_configs")
    (d / "test-tiny.json").write_text(json.dumps(TEST_TINY_CONFIG))
    open_clip.add_model_config(d)
    return "test-tiny"


TEST_TINY_COCA_CONFIG = {  # open_clip's coca_ViT-B-32, shrunk: the text tower appends a class token
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 48, "patch_size": 8, "head_width": 16,
                   "attentional_pool": True, "attn_pooler_heads": 4, "output_tokens": True},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                       "attn_pooler_heads": 4},
    "custom_text": True,
}


@pytest.fixture(scope="session")
def tiny_coca_name(tmp_path_factory):
    """Register a tiny CoCa config 'test-tiny-coca' (random weights) and return its name."""
    import open_clip
    d = tmp_path_factory.mktemp("coca_configs")
    (d / "test-tiny-coca.json").write_text(json.dumps(TEST_TINY_COCA_CONFIG))
    open_clip.add_model_config(d)
    return "test-tiny-coca"


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seed, and one torch thread: the tests' tensors are tiny, so extra threads only add overhead
    (and on a shared 2-core machine, oversubscription makes them 10-100x slower)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def zero_block():
    """Zero n bytes in the middle of a file, in place (a damaged disk block; the size stays)."""
    def damage(path, n: int = 64) -> None:
        data = bytearray(path.read_bytes())
        data[len(data) // 2:len(data) // 2 + n] = bytes(n)
        path.write_bytes(bytes(data))
    return damage


NEW_TF32_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")  # torch >= 2.9: fp32_precision strings


def _legacy_tf32_flags():
    """(cudnn, matmul) allow_tf32, or None where reading them raises (torch >= 2.9 after the new API set them)."""
    try:
        return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    except RuntimeError:
        return None


def _set_legacy_tf32_flags(cudnn=None, matmul=None):
    if cudnn is not None:
        torch.backends.cudnn.allow_tf32 = cudnn
    if matmul is not None:
        torch.backends.cuda.matmul.allow_tf32 = matmul


@pytest.fixture
def tf32_flags():
    """Set torch's TF32 switches in a test, restored after: monkeypatch.setattr cannot (pytest 9.2 undoes
    it with a delattr, which torch.backends.cuda.matmul refuses, and the undos queued after it are lost).
    Yields a setter: tf32_flags(cudnn=True, matmul=False) through the legacy allow_tf32 flags, or
    tf32_flags(matmul_precision="tf32") through torch >= 2.9's fp32_precision (skip where it is missing).
    Restored whichever API the test used: the legacy flags first (where they read), then the
    fp32_precision strings, so a switch that inherited ("none") inherits again and both APIs read as
    they did before."""
    b = torch.backends
    new = ([(b, "fp32_precision"), (b.cuda.matmul, "fp32_precision"), (b.cudnn, "fp32_precision"),
            (b.cudnn.conv, "fp32_precision")] if NEW_TF32_API else [])
    saved_new = [(obj, name, getattr(obj, name)) for obj, name in new]
    saved_legacy = _legacy_tf32_flags()

    def set_flags(cudnn=None, matmul=None, matmul_precision=None):
        _set_legacy_tf32_flags(cudnn, matmul)
        if matmul_precision is not None:
            torch.backends.cuda.matmul.fp32_precision = matmul_precision
    try:
        yield set_flags
    finally:
        if saved_legacy is not None:
            _set_legacy_tf32_flags(*saved_legacy)
        for obj, name, value in saved_new:
            setattr(obj, name, value)
