"""Method variants: what tests/method/test_method_variants.py leaves open.

Checks, against variants.py's docstring, README.md ("the ladder zeroshot -> ... -> segpcl,
onlyclip, distill_new_data") and method.md's ablation: a variant changes only its defining
switches (tuned values carry over); zeroshot turns every component off; every visual-branch
variant keeps the config's beta and refuses beta = 0, while every CLIP-path-only variant accepts
it; onlyclip resolves to +prototype_transfer's config and +visual_branch to segpcl's (so `ablate`
trains each pair once); lookups return copies and are case-exact.
At the end: what the audit of segpcl_fast/method since 7a90c2d found open (DPGD under fp16, anchor
sampling, the checkpoint reference check, acgd_source).
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from segpcl_fast.config import Config, ConfigError, DPGDConfig
from segpcl_fast.method import anchors, variants
from segpcl_fast.model.clip import load_model

# the switches a variant may set; every other field must come through from the run's config
SWITCHES = {("acgd", "enabled"), ("tsgr", "enabled"), ("prototypes", "transfer"), ("prototypes", "beta"),
            ("acgd", "source")}


def _config(method, beta=None):
    """The default config with run.method set as written (no validation: 'SEGPCL' must reach resolve)."""
    cfg = Config()
    cfg.run.method = method
    if beta is not None:
        cfg.prototypes.beta = beta
    return cfg


def _tuned(method):
    """A config with non-default tuned values, to see that they survive the variant."""
    cfg = _config(method)
    cfg.optim.lr = cfg.optim.lr * 3
    cfg.optim.epochs = cfg.optim.epochs + 2
    cfg.acgd.weight = cfg.acgd.weight * 2 + 0.25
    cfg.prototypes.beta = 0.3
    return cfg


def _switches(cfg):
    return (cfg.acgd.enabled, cfg.tsgr.enabled, cfg.prototypes.transfer, cfg.prototypes.beta)


def _uses_prototype_path(name):
    return variants.resolve_variant(_config(name)).prototypes.beta > 0


@pytest.mark.parametrize("name", variants.variant_names())
def test_variant_changes_only_its_switches(name):
    base = _tuned(name)
    got = variants.resolve_variant(base)
    allowed = SWITCHES | ({("optim", "epochs")} if name == "zeroshot" else set())
    changed = {(sec, key) for sec, fields in base.to_dict().items() for key, val in fields.items()
               if got.to_dict()[sec][key] != val}
    assert changed <= allowed, sorted(changed - allowed)


def test_zeroshot_turns_every_component_off():
    cfg = variants.resolve_variant(_config("zeroshot"))
    assert cfg.optim.epochs == 0
    assert _switches(cfg) == (False, False, False, 0.0)


@pytest.mark.parametrize("name", variants.VISUAL_BRANCH)
def test_visual_branch_variants_keep_beta_and_refuse_zero(name):
    assert variants.resolve_variant(_config(name, beta=0.3)).prototypes.beta == 0.3
    with pytest.raises(ConfigError, match="beta"):
        variants.resolve_variant(_config(name, beta=0.0))


@pytest.mark.parametrize("name", variants.variant_names())
def test_beta_zero_refused_exactly_for_the_prototype_path(name):
    # VISUAL_BRANCH must list exactly the variants whose inference uses the prototypes (beta > 0)
    assert (name in variants.VISUAL_BRANCH) == _uses_prototype_path(name)
    if name not in variants.VISUAL_BRANCH:  # CLIP path only: a config with beta = 0 is fine
        assert variants.resolve_variant(_config(name, beta=0.0)).prototypes.beta == 0.0


@pytest.mark.parametrize("pair", [("onlyclip", "+prototype_transfer"), ("+visual_branch", "segpcl")])
def test_documented_aliases_resolve_to_the_same_config(pair):
    a, b = (variants.resolve_variant(_tuned(n)).to_dict() for n in pair)
    a["run"].pop("method"), b["run"].pop("method")
    assert a == b


def test_ladder_starts_at_zeroshot_and_ends_with_the_references():
    assert variants.LADDER[0] == "zeroshot"
    assert variants.LADDER[-3:] == ["segpcl", "onlyclip", "distill_new_data"]
    assert len(set(variants.LADDER)) == len(variants.LADDER)


def test_names_and_lookups():
    assert variants.variant_names() == list(variants.VARIANTS)
    over = variants.variant_overrides("segpcl")
    over["acgd.enabled"] = False  # a caller editing its copy must not change the variant
    assert variants.VARIANTS["segpcl"]["acgd.enabled"] is True
    assert variants.resolve_variant(_config("segpcl")).acgd.enabled
    with pytest.raises(ConfigError, match="unknown method variant"):
        variants.resolve_variant(_config("SEGPCL"))


def test_resolve_returns_a_new_config():
    cfg = _config("lora_finetune")
    got = variants.resolve_variant(cfg)
    assert got is not cfg and dataclasses.asdict(cfg) == dataclasses.asdict(_config("lora_finetune"))


# ----------------------------------------------------------------------------- mutation audit since 7a90c2d:
# DPGD under fp16, the checkpoint's reference check, the step's loss terms (method.md; docstrings of
# anchors.run_dpgd / _fp16_pixel_gradient and learner.same_reference)


@pytest.fixture(scope="module")
def fp16_teacher(tiny_model_name):
    torch.manual_seed(0)
    model = load_model(tiny_model_name, pretrained=None)
    model.set_precision(image="fp16")
    return model


def _fp16_seeds(model, n=4, n_old=3):
    g = torch.Generator().manual_seed(3)
    pixels = torch.rand(n, 3, 32, 32, generator=g)
    mean = torch.tensor(model.image_stats.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.image_stats.std).view(1, 3, 1, 1)
    text = F.normalize(torch.randn(n_old, 32, generator=g), dim=-1)
    return (pixels - mean) / std, torch.arange(n) % n_old, text


def test_fp16_dpgd_refuses_a_batch_where_one_seed_alone_has_a_nonfinite_gradient(fp16_teacher):
    """run_dpgd's docstring: under fp16 a gradient that is not finite is refused ("or the seeds hold NaN
    pixels"); one NaN pixel in one seed makes only that seed's gradient NaN (eval mode: no sample mixing),
    the rest of the batch stays finite, and the batch must still be refused (any entry, not all)."""
    seeds, targets, text = _fp16_seeds(fp16_teacher)
    seeds[1, 0, 5, 5] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite under fp16 autocast"):
        anchors.run_dpgd(fp16_teacher, seeds, targets, text, None, 100.0, DPGDConfig(k_adv=1, batch_size=4),
                         fp16_teacher.image_stats.mean, fp16_teacher.image_stats.std)


def test_fp16_dpgd_leaves_an_anchor_with_a_zero_gradient_in_place(fp16_teacher):
    """One old class and no prototypes: CE over one class is 0 whatever x is, so grad_r L = 0 exactly. The
    fp16 path must pass that zero on (sign 0: PGD does not move the anchor, as in fp32), not 0 * (2^8 / tiny)
    = 0 * inf = NaN, which the finiteness check would refuse."""
    seeds, targets, text = _fp16_seeds(fp16_teacher, n_old=1)
    out = anchors.run_dpgd(fp16_teacher, seeds, targets, text, None, 100.0, DPGDConfig(k_adv=2),
                           fp16_teacher.image_stats.mean, fp16_teacher.image_stats.std)
    assert torch.equal(out, seeds)


def test_fp16_dpgd_keeps_pixel_gradients_of_a_tower_with_a_small_input_jacobian(tiny_model_name):
    """_fp16_pixel_gradient's docstring: the r(x) gradient enters the fp16 tower at norm 2^8 per anchor so the
    pixel gradient stays in fp16's range. A tower whose patch embedding is scaled by 1e-4 shrinks the pixel
    gradient 1e4-fold: fp32 keeps every entry non-zero, and the fp16 path must too (all but < 0.1 %; entering
    at unit norm, 2.3 % flush to zero here and stop moving)."""
    torch.manual_seed(0)
    model = load_model(tiny_model_name, pretrained=None)
    with torch.no_grad():
        model.visual.conv1.weight.mul_(1e-4)
    g = torch.Generator().manual_seed(3)
    pixels = torch.rand(4, 3, 32, 32, generator=g)
    mean = torch.tensor(model.image_stats.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.image_stats.std).view(1, 3, 1, 1)
    seeds = (pixels - mean) / std
    text = F.normalize(torch.randn(3, 32, generator=g), dim=-1)
    protos = torch.randn(3, 48, generator=g)
    targets = torch.arange(4) % 3

    def pixel_grad(fp16):
        with anchors.frozen_eval(model), torch.enable_grad():
            x = seeds.clone().requires_grad_(True)
            if fp16:
                return anchors._fp16_pixel_gradient(model, x, targets, text, protos, 100.0, 1.0)
            raw, emb = model.encode_image(x)
            return torch.autograd.grad(anchors.dpgd_loss(raw, emb, targets, text, protos, 100.0, 1.0), x)[0]
    g32 = pixel_grad(False)
    assert bool((g32 != 0).all())
    model.set_precision(image="fp16")
    g16 = pixel_grad(True)
    assert float((g16 == 0).float().mean()) < 1e-3
    assert float((g16.sign() == g32.sign()).float().mean()) > 0.99


def test_drawing_anchors_from_an_empty_cache_is_refused_by_both_samplers():
    """An empty anchor cache has nothing for ACGD to distil on: both samplers refuse it (an empty batch
    would make the ACGD term a mean over no anchors), as they refuse n < 1."""
    empty = anchors.AnchorCache(torch.zeros(0, 3, 4, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, 3),
                                torch.zeros(0, 5))
    with pytest.raises(ValueError, match="sample_anchor_batch: the anchor cache is empty"):
        anchors.sample_anchor_batch(empty, 4, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="sample_anchor_inputs: the anchor cache is empty"):
        anchors.sample_anchor_inputs(empty, 4, torch.Generator().manual_seed(0))


def test_a_reference_of_another_class_count_is_a_mismatch_not_a_broadcast_error():
    """same_reference: a checkpoint's reference embeddings with another number of rows (another class list)
    are not this model's: False, not torch.allclose's size error; a row-for-row equal one is."""
    from segpcl_fast.method.learner import same_reference
    ref = F.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    for precision in ("fp32", "bf16", "fp16"):
        assert same_reference(ref.clone(), ref, precision)
        assert same_reference(ref[:5], ref, precision) is False
        assert same_reference(ref[:1], ref[:1].expand(6, 8), precision) is False  # would broadcast to equal


def test_fp16_references_get_bf16s_tolerance_and_fp32_its_own():
    """same_reference's docstring: bf16 and fp16 towers round differently per kernel and both get bf16's
    tolerance (2e-2); fp32 (with TF32 GEMMs) 2.5e-3. A reference off by 5e-3 is the same tower at fp16 and
    bf16, another one at fp32; off by 5e-2, another one at every precision."""
    from segpcl_fast.method.learner import same_reference
    ref = F.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert same_reference(ref + 5e-3, ref, "fp16") and same_reference(ref + 5e-3, ref, "bf16")
    assert not same_reference(ref + 5e-3, ref, "fp32") and same_reference(ref + 1e-3, ref, "fp32")
    assert not any(same_reference(ref + 5e-2, ref, p) for p in ("fp16", "bf16", "fp32"))


def test_acgd_with_weight_0_builds_no_anchor_cache():
    """acgd_source: ACGD runs only where enabled and acgd.weight > 0 (a weight of 0 turns the term off, the
    way variants.py tells users to): no ACGD source then, and without the drift transfer no anchor cache
    (stage 1 runs no DPGD for nothing)."""
    from segpcl_fast.method.learner import acgd_source, builds_anchor_cache
    cfg = Config()
    assert acgd_source(cfg) == cfg.acgd.source and builds_anchor_cache(cfg)
    cfg.acgd.weight = 0.0
    assert acgd_source(cfg) is None and builds_anchor_cache(cfg)  # the transfer still needs DPGD anchors
    cfg.prototypes.transfer = False
    assert not builds_anchor_cache(cfg)
    cfg.acgd.weight, cfg.acgd.enabled = 5.0, False
    assert acgd_source(cfg) is None and not builds_anchor_cache(cfg)



def test_a_steps_anchor_draw_follows_the_learners_generator_not_torchs_global_rng(tiny_model_name):
    """The ACGD anchors of a step are drawn from learner.anchor_generator (seeded per task: a resumed run
    redraws the same anchors), never from torch's global RNG: with acgd.anchor_batch = 2 of 8 cached
    anchors, the same generator state gives the same L_ACGD whatever the global seed, and the global RNG
    is not advanced by the draw."""
    from segpcl_fast.method.learner import Learner
    from segpcl_fast.model.lora import inject_lora
    torch.manual_seed(0)
    model = load_model(tiny_model_name, pretrained=None)
    inject_lora(model, rank=4, alpha=4, targets=("k", "v"), towers=("visual", "text"))
    cfg = Config()
    cfg.acgd.anchor_batch = 2
    learner = Learner(cfg, model, [[f"a good photo of a class {i}."] for i in range(6)], torch.device("cpu"))
    learner.n_old, learner.n_new = 3, 3
    g = torch.Generator().manual_seed(1)
    learner.anchor_cache = anchors.AnchorCache(torch.randn(8, 3, 32, 32, generator=g), torch.arange(8) % 3,
                                               30 * torch.randn(8, 3, generator=g), torch.randn(8, 48, generator=g))
    images, labels = torch.randn(4, 3, 32, 32, generator=g), torch.tensor([3, 4, 5, 3])
    values = []
    for global_seed in (1, 2, 3):
        learner.anchor_generator.manual_seed(7)
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        with torch.no_grad():
            _, parts = learner.loss(images, labels)
        assert torch.equal(torch.get_rng_state(), before)
        values.append(float(parts["acgd"]))
    assert values[0] == values[1] == values[2]


def test_the_image_reference_check_takes_run_precision_not_text_precision(tiny_model_name):
    """load_state_dict checks ref_image at the image tower's precision (run.precision): a bf16 image tower
    with an fp32 text tower accepts probe embeddings off by 5e-3 (bf16 rounding on another kernel), which
    the fp32 tolerance (2.5e-3) would refuse."""
    from segpcl_fast.method.learner import Learner
    torch.manual_seed(0)
    model = load_model(tiny_model_name, pretrained=None)
    cfg = Config()
    cfg.run.precision, cfg.run.text_precision = "bf16", "fp32"
    learner = Learner(cfg, model, [[f"a good photo of a class {i}."] for i in range(4)], torch.device("cpu"))
    state = learner.state_dict()
    state["ref_image"] = state["ref_image"] + 5e-3
    learner.load_state_dict(state)
    cfg.run.precision = "fp32"
    with pytest.raises(RuntimeError, match="reference image embeddings differ"):
        learner.load_state_dict(state)


def test_a_variant_warns_only_about_keys_the_config_set_away_from_their_default(monkeypatch, caplog):
    """variants.py: a config's own value of a key the variant owns is replaced, with a warning when it was set
    away from its default; a default value (the plain config of lora_finetune, whose switches differ from
    the defaults) is replaced silently."""
    import logging
    monkeypatch.setattr(variants, "_warned", set())
    with caplog.at_level(logging.WARNING, logger=variants.log.name):
        variants.resolve_variant(_config("lora_finetune"))
        assert caplog.records == []
        cfg = _config("segpcl")
        cfg.acgd.enabled = False
        variants.resolve_variant(cfg)
    assert len(caplog.records) == 1 and "acgd.enabled=False -> True" in caplog.text
