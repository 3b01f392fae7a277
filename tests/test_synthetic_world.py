"""The offline world: deterministic rendering, sane splits, and the shipped tiny CLIP."""
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from segpcl_fast.config import Config, DataConfig
from segpcl_fast.data import synthetic
from segpcl_fast.data.base import ArrayDataset

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "segpcl_fast" / "assets" / "segpcl-tiny-world.pt"
MODEL_CONFIGS = ROOT / "segpcl_fast" / "model_configs"

SMALL = dict(max_train_per_class=3, max_test_per_class=2)


def test_same_seed_same_world_and_different_seed_different_world():
    a = synthetic.render_split.__wrapped__(5, "shifted", "train", 2)  # bypass the cache
    b = synthetic.render_split.__wrapped__(5, "shifted", "train", 2)
    c = synthetic.render_split.__wrapped__(6, "shifted", "train", 2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert (a[0] != c[0]).mean() > 0.5


def test_world_does_not_touch_global_rng():
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    synthetic.render_split.__wrapped__(0, "source", "pretrain", 1)
    assert np.random.random() == before


def test_class_names_unique_words_and_attributes_shared():
    names = synthetic.class_names()
    assert len(names) == 100 and len(set(names)) == 100
    for n in names:
        words = n.split()
        assert len(words) == 2 and all(w.isalpha() and w.islower() for w in words)
    # every colour appears with every shape: classes share attributes
    assert {n.split()[0] for n in names} == set(synthetic.COLOUR_NAMES)
    assert {n.split()[1] for n in names} == set(synthetic.SHAPES)


def test_world_by_colour_preset_gives_one_colour_per_task():
    from segpcl_fast.config import load_config
    from segpcl_fast.data.protocol import resolve_class_order, split_tasks
    cfg = load_config("world-by-colour")
    assert cfg.data.dataset == "synthetic" and cfg.model == Config().model  # the bundled tiny CLIP
    names = synthetic.class_names()
    order = resolve_class_order(cfg.data.class_order, names, cfg.data.order_seed)
    tasks = [[names[order[label]] for label in labels]  # ordered label -> dataset class -> name
             for labels in split_tasks(len(names), cfg.data.num_tasks, cfg.data.task_sizes)]
    colours = [{n.split()[0] for n in task} for task in tasks]
    assert all(len(c) == 1 for c in colours)                        # one colour per task ...
    assert [c.pop() for c in colours] == list(synthetic.COLOUR_NAMES)  # ... each colour once
    assert all({n.split()[1] for n in task} == set(synthetic.SHAPES) for task in tasks)


def test_cl_datasets_interface_caps_and_disjoint_splits():
    train, test = synthetic.build_synthetic_datasets(DataConfig(**SMALL), None, None)
    assert isinstance(train, ArrayDataset) and isinstance(test, ArrayDataset)
    assert len(train) == 300 and len(test) == 200
    assert np.bincount(train.targets, minlength=100).tolist() == [3] * 100
    assert np.bincount(test.targets, minlength=100).tolist() == [2] * 100
    img, label = train[7]
    assert img.size == (32, 32) and img.mode == "RGB" and label == train.targets[7]
    # no test image is a copy of a train image
    tr = train.images.reshape(len(train), -1)
    te = test.images.reshape(len(test), -1)
    dists = np.abs(tr[:, None, :].astype(np.int16) - te[None, :, :].astype(np.int16)).mean(-1)
    assert dists.min() > 5


def test_cap_gives_a_prefix_of_the_larger_world_and_seed_is_honoured():
    _, small = synthetic.build_synthetic_datasets(DataConfig(max_test_per_class=1), None, None)
    _, larger = synthetic.build_synthetic_datasets(DataConfig(max_test_per_class=3), None, None)
    np.testing.assert_array_equal(small.images, larger.images[:100])
    assert small.targets == larger.targets[:100]
    _, other = synthetic.build_synthetic_datasets(DataConfig(max_test_per_class=1, synthetic_seed=1), None, None)
    assert (small.images != other.images).mean() > 0.5


def test_negative_cap_is_a_clear_error():
    with pytest.raises(ValueError, match="max_train_per_class"):
        synthetic.build_synthetic_datasets(DataConfig(max_train_per_class=-1), None, None)


def test_domains_differ_in_style():
    src = synthetic.render_split(0, "source", "test", 2)[0].astype(np.float32)
    shf = synthetic.render_split(0, "shifted", "test", 2)[0].astype(np.float32)
    sk = synthetic.render_split(0, "sketch", "heldout", 2)[0].astype(np.float32)
    # source backgrounds are grey and flat, shifted ones are colourful and textured, sketches are bright paper
    border = lambda x: np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)  # noqa: E731
    saturation = lambda x: (border(x).max(-1) - border(x).min(-1)).mean()  # noqa: E731
    assert saturation(shf) > 1.4 * saturation(src)
    assert border(shf).std(axis=1).mean() > 1.8 * border(src).std(axis=1).mean()
    assert border(sk).mean() > 200 > border(src).mean()


def test_shift_option_moves_the_cl_domain_between_source_and_full_shift():
    assert DataConfig().synthetic_shift == synthetic.SHIFT_STRENGTH  # config default = the world's constant
    default, _ = synthetic.build_synthetic_datasets(DataConfig(max_train_per_class=2), None, None)
    explicit = synthetic.render_split.__wrapped__(0, "shifted", "train", 2, synthetic.SHIFT_STRENGTH)[0]
    np.testing.assert_array_equal(default.images, explicit)
    border = lambda x: np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)  # noqa: E731
    saturation = lambda x: (border(x).max(-1) - border(x).min(-1)).mean()  # noqa: E731
    src = synthetic.render_split(0, "source", "test", 2)[0].astype(np.float32)
    sat = {}
    for shift in (0.0, 0.35, 1.0):
        ds, _ = synthetic.build_synthetic_datasets(DataConfig(max_train_per_class=2, synthetic_shift=shift), None, None)
        sat[shift] = saturation(ds.images.astype(np.float32))
    # background saturation grows with the shift and starts at the source's
    assert sat[0.0] < sat[0.35] < sat[1.0]
    assert abs(sat[0.0] - saturation(src)) < 0.15 * saturation(src)


def test_shift_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match="synthetic_shift"):
        synthetic.build_synthetic_datasets(DataConfig(max_train_per_class=1, synthetic_shift=1.5), None, None)
    with pytest.raises(ValueError, match="shifted"):
        synthetic.render_split.__wrapped__(0, "source", "test", 1, 0.2)


def test_pretraining_captions_name_the_class():
    ds = synthetic.build_pretraining_dataset(seed=0, per_class=1)
    assert len(ds.captions) == len(ds) == 100
    for cap, t in zip(ds.captions, ds.targets):
        assert ds.class_names[t] in cap


def test_heldout_refuses_the_cl_domain():
    with pytest.raises(ValueError, match="held-out"):
        synthetic.build_heldout_dataset(domain="shifted")


@pytest.fixture(scope="module")
def tiny_clip():
    if not ASSET.exists():
        pytest.fail(f"shipped checkpoint missing: {ASSET}; regenerate with scripts/pretrain_tiny_clip.py")
    torch.manual_seed(0)
    open_clip.add_model_config(MODEL_CONFIGS)
    model, _, preprocess = open_clip.create_model_and_transforms("segpcl-tiny", pretrained=str(ASSET))
    return model.eval(), preprocess, open_clip.get_tokenizer("segpcl-tiny")


@torch.no_grad()
def _zeroshot_acc(model, preprocess, tokenizer, ds):
    text = model.encode_text(tokenizer([f"a good photo of a {c}." for c in ds.class_names]))
    img = model.encode_image(torch.stack([preprocess(ds.load_image(i)) for i in range(len(ds))]))
    assert torch.isfinite(text).all() and torch.isfinite(img).all()
    pred = (torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T).argmax(-1)
    return (pred.numpy() == np.asarray(ds.targets)).mean()


def test_checkpoint_loads_through_open_clip_in_fp32(tiny_clip):
    model, _, tokenizer = tiny_clip
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert isinstance(model.visual.transformer.resblocks[0].attn, torch.nn.MultiheadAttention)
    emb = model.encode_text(tokenizer(["a good photo of a striped blue circle."]))
    assert emb.shape == (1, 64) and torch.isfinite(emb).all()
    assert 1.0 < model.logit_scale.exp().item() <= 100.0
    # the weights are the trained ones, not a fresh init
    fresh = open_clip.create_model("segpcl-tiny")
    assert not torch.allclose(fresh.visual.conv1.weight, model.visual.conv1.weight)


def test_zeroshot_clearly_above_chance(tiny_clip):
    model, preprocess, tokenizer = tiny_clip
    source = synthetic.build_source_test_dataset(seed=0, per_class=1)
    _, shifted = synthetic.build_synthetic_datasets(DataConfig(max_test_per_class=2), None, None)
    acc_source = _zeroshot_acc(model, preprocess, tokenizer, source)
    acc_shifted = _zeroshot_acc(model, preprocess, tokenizer, shifted)
    assert acc_source > 0.6  # chance is 0.01
    assert 0.15 < acc_shifted < acc_source  # the shifted domain is harder, but far above chance


def test_default_cli_run_uses_the_bundled_model_with_no_network(tmp_path, monkeypatch, capsys):
    """`segpcl-fast train` with the default config (synthetic world, shipped segpcl-tiny weights), with
    every socket refused: nothing is fetched. Shortened by --set (2 tasks, 2 steps each)."""
    import json
    import socket

    from segpcl_fast.cli import main
    from segpcl_fast.config import Config

    def no_network(*args, **kwargs):
        raise AssertionError("the default run tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.chdir(tmp_path)
    defaults = Config()
    assert (defaults.model.name, defaults.model.pretrained, defaults.data.dataset) == \
        ("segpcl-tiny", "segpcl-world", "synthetic")
    rc = main(["train", "--set", "data.num_tasks=2", "--set", "run.max_steps_per_task=2",
               "--set", "data.max_train_per_class=2", "--set", "data.max_test_per_class=2",
               "--set", "run.num_threads=1", "--set", "run.progress=false", "--set", "run.plots=false"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Last" in printed and "Forgetting" in printed
    # each task's accuracy as it ends, without -v (a review's finding: nothing until the results)
    lines = [line for line in printed.splitlines() if ": acc on seen classes " in line]
    assert [line.split(":")[0] for line in lines] == ["task 1/2", "task 2/2"], printed
    assert printed.index("task 2/2: acc") < printed.index("Forgetting")
    res = json.loads((tmp_path / "runs" / "default" / "results.json").read_text())
    assert res["config"]["model"]["pretrained"] == "segpcl-world"
    # the pretrained weights are in use: zero-shot forward transfer on task 2 is far above chance (1%)
    assert res["fwt_before"][1] > 10.0


def test_bf16_drift_script_runs_and_shows_rounding_shrinking_with_the_update():
    """scripts/bf16_lora_drift.py (RESULTS.md's table): the larger the LoRA update, the smaller
    bf16's share of it and the closer d_bf16 points along d_fp32."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bf16_lora_drift.py"), "--images", "4",
                           "--scales", "1e-4,1e-2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines()[-2:]]
    (small_err, small_cos), (large_err, large_cos) = [(float(r[2]), float(r[3])) for r in rows]
    assert small_err > 1 > large_err and small_cos < large_cos
