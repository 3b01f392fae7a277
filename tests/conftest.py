import json

import pytest
import torch

TEST_TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_model_name(tmp_path_factory):
    """Register a 2-layer open_clip config 'test-tiny' (random weights) and return its name."""
    import open_clip
    d = tmp_path_factory.mktemp("model_configs")
    (d / "test-tiny.json").write_text(json.dumps(TEST_TINY_CONFIG))
    open_clip.add_model_config(d)
    return "test-tiny"


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seed, and one torch thread: the tests' tensors are tiny, so extra threads only add overhead
    (and on a shared 2-core machine, oversubscription makes them 10-100x slower)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
