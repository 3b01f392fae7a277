"""The benchmark presets, resolved as a user gets them (make_config, the CLI with and without --hw, the
segpcl variant), keep the paper's / method.md's values: nothing in the chain overrides them."""
import pytest

from segpcl_fast.api import make_config
from segpcl_fast.config import preset_names
from segpcl_fast.engine import presets
from segpcl_fast.method.variants import resolve_variant

# method.md (shared/method.md) and the paper summary; [choice] values as method.md states them
METHOD_MD = {
    "lora.rank": 32, "lora.targets": ["k", "v", "c_fc", "c_proj"], "lora.towers": ["visual", "text"],
    "dpgd.k_seed": 5, "dpgd.k_adv": 10, "dpgd.gamma": 1.5e-3, "dpgd.eps": 8 / 255, "dpgd.lambda_p": 1.0,
    "dpgd.random_start": False,
    "acgd.enabled": True, "acgd.weight": 5.0, "acgd.tau": 20.0, "acgd.anchor_batch": 0, "acgd.source": "anchors",
    "tsgr.enabled": True, "tsgr.weight": 1.0, "tsgr.k": 10, "tsgr.tau": 0.05, "tsgr.reference": "pretrained",
    "prototypes.transfer": True, "prototypes.beta": 0.5, "prototypes.weight_rule": "relu_cos",
    "optim.lr": 1e-3, "optim.momentum": 0.9, "optim.batch_size": 128, "optim.epochs": 10, "optim.schedule": "cosine",
    "optim.warmup_steps": 0, "optim.cls_over": "current",
    "data.templates": ["a good photo of a {}."], "data.num_tasks": 10,
    "model.pretrained": "openai", "run.method": "segpcl",
}
# the five benchmarks: classes in all, and classes per task (10 tasks each)
BENCHMARKS = {"cifar100": (100, [10] * 10), "imagenet-r": (200, [20] * 10), "imagenet-subset": (100, [10] * 10),
              "cub200": (200, [20] * 10), "ucf101": (101, [11] + [10] * 9)}


def _value(cfg, dotted):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _resolved(name, hw):
    cfg = make_config(name)
    if hw is not None:
        cfg = make_config(presets.apply_preset(cfg, hw, export_env=False))
    return resolve_variant(cfg)


def test_every_benchmark_preset_is_listed():
    assert set(BENCHMARKS) <= set(preset_names())


@pytest.mark.parametrize("hw", [None, "1gpu", "2x4090"])
@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_a_benchmark_preset_resolves_to_method_md(name, hw):
    cfg = _resolved(name, hw)
    wrong = {k: (_value(cfg, k), v) for k, v in METHOD_MD.items() if _value(cfg, k) != pytest.approx(v)}
    assert not wrong, f"{name} --hw {hw}: (resolved, method.md) {wrong}"
    assert cfg.model.name in ("ViT-B-16", "ViT-B-16-quickgelu")
    total, sizes = BENCHMARKS[name]
    assert cfg.data.dataset == name and cfg.data.expected_classes == total
    assert (cfg.data.task_sizes or [total // cfg.data.num_tasks] * cfg.data.num_tasks) == sizes
    assert (cfg.data.class_order, cfg.data.order_seed) == ("seeded", 1993)  # [choice] PyCIL's order (README)
