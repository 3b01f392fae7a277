"""Configuration: one dataclass per concern, every default of ../shared/method.md lives here.

Ground floor: imports nothing from the rest of the package but fileio (atomic writes).

    cfg = Config()                              # method.md defaults, offline world
    cfg = load_config("configs/cifar100.yaml")  # YAML, partial: missing keys keep defaults
    cfg = apply_overrides(cfg, ["dpgd.k_adv=5", "optim.lr=3e-4"])
    save_config(cfg, "run/config.yaml")

Every Config built from user input (config_from_dict, apply_overrides, load_config) goes through
validate(): one ConfigError lists each invalid key, its value and what it accepts (RULES).

Fields marked [choice] are ours where the paper is silent; method.md marks the choices it states, and
some it does not state at all (alpha, A's seed, the class order, augmentation, weight decay) are marked
only here.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from .fileio import atomic_write_text


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the fix."""


@dataclass
class ModelConfig:
    # open_clip model name (e.g. "ViT-B-16") and pretrained tag ("openai") or a local file path. The model runs the
    # activation its weights were trained with: QuickGELU for a tag trained with it (OpenAI's) or OpenAI's own
    # TorchScript file, even under a GELU name such as ViT-B-16 (model.clip.weights_quick_gelu); a local state
    # dict of OpenAI's weights needs the -quickgelu name (ViT-B-16-quickgelu, the presets' name).
    # Default: the tiny CLIP shipped with the package, pretrained on the offline synthetic world.
    name: str = "segpcl-tiny"
    pretrained: Optional[str] = "segpcl-world"
    cache_dir: Optional[str] = None
    # the image preprocessing (normalisation and test-transform geometry). null: open_clip's for these
    # weights: a tag's own when loading by tag, the model config's (OpenAI's for most) for a local file.
    # A tag of this model (e.g. "webli") applies that tag's preprocessing to a local copy of its weights;
    # a mapping sets any of mean, std, interpolation, resize_mode, fill_color (open_clip's
    # force_preprocess_cfg).
    preprocess: Any = None


@dataclass
class LoRAConfig:
    rank: int = 32
    alpha: float = 32.0  # [choice] scaling alpha / rank = 1
    targets: list[str] = field(default_factory=lambda: ["k", "v", "c_fc", "c_proj"])  # [choice]
    towers: list[str] = field(default_factory=lambda: ["visual", "text"])
    # seed of the frozen Kaiming-uniform A matrices [choice]: the same A for every run.seed, so seeds
    # vary shuffling, augmentation and anchor sampling only; null draws A from run.seed instead
    init_seed: Optional[int] = 0  # [choice]


@dataclass
class DataConfig:
    # "synthetic" (offline world), "cifar100", "imagenet-r", "imagenet-subset", "cub200", "ucf101", or
    # "imagefolder" (any dataset in torchvision ImageFolder's layout, data/imagefolder.py)
    dataset: str = "synthetic"
    root: Optional[str] = None
    num_tasks: int = 10
    task_sizes: Optional[list[int]] = None  # explicit classes per task (e.g. UCF101: [11, 10, ...])
    # "seeded" shuffles class ids with order_seed (1993: PyCIL's np.random.seed(1993) permutation,
    # also RAPF's ImageNet-100 order; RAPF's other orders are explicit lists); "natural" keeps
    # the dataset's order; or an explicit list of class names, the dataset's class ids (ImageNet wnids; CUB and
    # ImageFolder folder names; UCF101's classInd.txt / CoOp names, spelled either way) and / or indices.
    # [choice] (the paper names none)
    class_order: Any = "seeded"
    order_seed: int = 1993
    templates: list[str] = field(default_factory=lambda: ["a good photo of a {}."])  # [choice]
    train_augment: bool = True  # [choice] RandomResizedCrop(0.6-1.0) + flip (data/transforms.py)
    num_workers: int = 0
    # training images per class: a seeded cap on datasets read from files (0 = all); on the synthetic
    # world the number rendered (0 = its default 40; more renders more); small values: smoke runs
    max_train_per_class: int = 0
    max_test_per_class: int = 0
    synthetic_seed: int = 0  # the offline world is generated from this seed
    # how far the offline world's continual-learning domain is from the pretraining domain
    # (0 = source-like style, 1 = full shift); 0.35, chosen in RESULTS.md (synthetic.SHIFT_STRENGTH reads it)
    synthetic_shift: float = 0.35
    # format-specific options (see segpcl_fast/data/*.py)
    # wnid -> name mapping (ImageNet-R README.txt, LOC_synset_mapping.txt, JSON); imagefolder: folder -> name
    names_file: Optional[str] = None
    class_list: Optional[str] = None  # ImageNet-Subset: file of wnids (default <root>/imagenet100.txt)
    frames_dir: Optional[str] = None  # UCF101: folder of middle frames / frame folders (auto-detected)
    official_split: int = 1  # UCF101: which of its three official train / test splits (trainlist0N / testlist0N)
    split_seed: int = 0  # ImageNet-R, imagefolder: seeded per-class train/test split when no split is given
    test_fraction: float = 0.2  # ImageNet-R, imagefolder: test share of the seeded split
    # ImageNet-R: train/test split file in RAPF's format (a line 'train', then '<wnid>/<file>.jpg'
    # lines, a line 'test', then its lines); None = auto-detect (see data/imagenet_r.py)
    split_file: Optional[str] = None
    # number of classes data.root must hold (the benchmark presets set theirs: CIFAR100 100,
    # ImageNet-R 200, ...); None or 0 = no check (a deliberate subset)
    expected_classes: Optional[int] = None


@dataclass
class DPGDConfig:
    k_seed: int = 5
    k_adv: int = 10
    gamma: float = 1.5e-3  # step size, [0,1] pixel units
    # [choice] L_inf radius, [0,1] pixel units; inactive at the defaults: K_adv steps of gamma move a
    # pixel at most K_adv * gamma = 0.015 < 8/255, so only an eps below that (or more steps) binds
    eps: float = 8.0 / 255.0
    lambda_p: float = 1.0  # [choice] weight of the raw-prototype (visual anchoring) term
    random_start: bool = False  # [choice]
    # anchors per PGD batch: a memory knob, equal results in exact arithmetic; in fp32 the GEMMs round
    # differently per batch size and sign(grad) turns that into whole gamma steps on a few pixels
    batch_size: int = 64


@dataclass
class ACGDConfig:
    enabled: bool = True
    weight: float = 5.0  # lambda_ACGD
    tau: float = 20.0  # tau_A
    # anchors per step on each process [choice]: 0 = as many as its image batch; drawn without replacement, so while
    # A_t has fewer (CIFAR100 task 2: 50 anchors, batch 128) every step uses all of A_t, shuffled
    anchor_batch: int = 0
    # distillation source: "anchors" (DPGD), "new_data" (raw task images), "seeds" (no PGD),
    # "folder" (ZSCL-style unlabeled reference images from source_folder)
    source: str = "anchors"
    source_folder: Optional[str] = None


@dataclass
class TSGRConfig:
    enabled: bool = True
    weight: float = 1.0  # lambda_GR
    k: int = 10
    tau: float = 0.05  # tau_T
    # whose text space the subgraphs keep: "pretrained" (method.md: u_0 with B = 0, fixed for the whole run) or
    # "teacher" (the model's own text at the task's start, i.e. at the end of task t-1, built again every task:
    # the paper summary's "match the teacher's"; L_GR is then 0 at each task's first step) [choice]
    reference: str = "pretrained"


@dataclass
class PrototypeConfig:
    transfer: bool = True  # anchor-induced drift transfer of old prototypes
    beta: float = 0.5  # weight of the visual (prototype) path at inference; 0 = onlyCLIP
    weight_rule: str = "relu_cos"  # [choice] w_a,c = max(0, cos(r_T(x_a), p_c))


@dataclass
class OptimConfig:
    lr: float = 1e-3
    momentum: float = 0.9  # [choice]; the optimiser (and its momentum) is new at every task
    weight_decay: float = 0.0  # [choice]
    batch_size: int = 128
    epochs: int = 10
    schedule: str = "cosine"  # "cosine" over the task's steps, or "constant"
    warmup_steps: int = 0
    cls_over: str = "current"  # [choice] L_cls over "current" task classes or all "seen" classes
    grad_clip: float = 0.0  # 0 = off
    fused: str = "auto"  # SGD implementation: "auto" (torch fused on CUDA > foreach), "foreach", "apex"


@dataclass
class EvalConfig:
    batch_size: int = 256
    fwt: bool = True  # also measure forward transfer (accuracy on task j before training it)


@dataclass
class RunConfig:
    # which method: "segpcl" (full), "lora_finetune", "zeroshot", "onlyclip", "+acgd", "+tsgr",
    # "+prototype_transfer", "+visual_branch", "distill_new_data", ...; see method/variants.py
    method: str = "segpcl"
    seed: int = 0
    output_dir: str = "runs/default"
    device: str = "auto"  # "auto" = cuda if available else cpu
    # "fp32", "bf16" or "fp16": the image tower under that autocast (method math stays fp32). fp16 (for
    # GPUs without bf16: V100, T4) trains with dynamic loss scaling (torch.amp.GradScaler, one per task)
    precision: str = "fp32"
    # [choice] the text transformer: "fp32" (default: TSGR compares text embeddings at tau_T = 0.05,
    # where bf16 rounding shows), "bf16" or "fp16" (under autocast, faster on a GPU; embeddings still fp32)
    text_precision: str = "fp32"
    # [choice] true: fp32 matmuls on CUDA (the text transformer at text_precision fp32, the projections,
    # logits, TSGR similarities) may use TF32 tensor cores for the run (torch's switch set, given back
    # after; model/tf32.py); false leaves torch's switch as the process set it (off by torch's default)
    tf32: bool = False
    compile: bool = False  # torch.compile the student step
    ops: str = "auto"  # fused-op backend: "auto", "reference", "triton", "cpp"
    num_threads: int = 0  # torch CPU threads; 0 = torch default
    checkpoint: bool = True  # checkpoint after every task
    resume: bool = False
    # a new (not resumed) run refuses an output_dir that holds another run unless this is true;
    # true replaces it (its checkpoints are removed first)
    overwrite: bool = False
    progress: bool = True  # tqdm bars
    plots: bool = True
    # TensorBoard event files in <output_dir>/tensorboard (per-step loss terms and lr, per-task accuracies;
    # engine/tensorboard_log.py); needs the tensorboard package
    tensorboard: bool = False
    max_steps_per_task: int = 0  # 0 = full epochs; >0 caps steps (smoke tests, profiling)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dpgd: DPGDConfig = field(default_factory=DPGDConfig)
    acgd: ACGDConfig = field(default_factory=ACGDConfig)
    tsgr: TSGRConfig = field(default_factory=TSGRConfig)
    prototypes: PrototypeConfig = field(default_factory=PrototypeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- dict <-> config

def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_number(text: str) -> Any:
    """int or float parsed from `text` ("5", "1e-3", "1e3"); `text` itself when neither parses."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


# list keys where one string means a list of one: a template is a sentence, never a comma list. Not
# lora.targets: in a sweep, `lora.targets=k,v` would then silently mean two runs ([k], [v]), not one.
ONE_STRING_LISTS = ("data.templates",)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert `value` to the annotated type `tp`; raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, str) and key in ONE_STRING_LISTS:  # one template: a list of one
            value = [value]
        if not isinstance(value, list):
            hint = f" (in brackets: {key}=[{value}])" if isinstance(value, str) and "," in value else ""
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}{hint}")
        return [_coerce(v, args[0], key) for v in value] if args else value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, str):  # YAML 1.1 reads 1e3 as a string
            value = _parse_number(value)
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            value = _parse_number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            # YAML read the text as another type: a number comes back as written; a bool or null may have
            # been spelled no / off / ~ ..., so the hint cannot repeat it
            name = key.split(".")[-1]
            if isinstance(value, (bool, type(None))):
                hint = (f" (YAML read the text as {value}: in a YAML file quote the text you meant, {name}: '...'; "
                        f"leave the key out for its default)")
            else:
                hint = f" (in a YAML file, quote it: {name}: '{value}')" if isinstance(value, (int, float)) else ""
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}{hint}")
        return value
    return value


# ----------------------------------------------------------------------------- validation
# Accepted values, copied from the code that consumes each key (config.py imports nothing from the
# package; tests/test_config.py checks these tuples against the consumers' own constants).
METHODS = ("zeroshot", "lora_finetune", "+acgd", "+tsgr", "+prototype_transfer", "+visual_branch", "segpcl",
           "onlyclip", "visual_no_transfer", "distill_new_data", "distill_seeds")  # method/variants.py VARIANTS
PRECISIONS = ("fp32", "bf16", "fp16")  # model.CLIPModel.set_precision: "bf16" / "fp16" autocast the tower
OPS_BACKENDS = ("auto", "reference", "triton", "cpp")  # ops/dispatch.py BACKENDS
SCHEDULES = ("cosine", "constant")  # engine/trainer.py lr_at
CLS_OVER = ("current", "seen")  # method/learner.py
FUSED_SGD = ("auto", "foreach", "apex")  # engine/trainer.py make_optimizer
ACGD_SOURCES = ("anchors", "new_data", "seeds", "folder")  # method/learner.py
WEIGHT_RULES = ("relu_cos", "uniform")  # method/prototypes.py WEIGHT_RULES
TSGR_REFERENCES = ("pretrained", "teacher")  # method/learner.py begin_task
# acgd.tau's ceiling: tau^2 * KL of two near-uniform softmaxes is lost to fp32 rounding above it (the
# log-probs are about -log C); tests/method/test_method_losses.py measures the loss against float64 there
MAX_ACGD_TAU = 1000.0
LORA_TARGETS = ("q", "k", "v", "out", "c_fc", "c_proj")  # model/lora.py VALID_TARGETS
LORA_TOWERS = ("visual", "text")  # model/lora.py VALID_TOWERS
DATASETS = ("synthetic", "cifar100", "imagenet-r", "imagenet-subset", "cub200", "ucf101",  # data/build.py
            "imagefolder")
CLASS_ORDERS = ("seeded", "natural")  # data/protocol.py (or an explicit list)
PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode", "fill_color")  # model/clip.py PREPROCESS_KEYS
RESIZE_MODES = ("shortest", "longest", "squash")  # data/transforms.py RESIZE_MODES
INTERPOLATIONS = ("bicubic", "bilinear", "random")  # data/transforms.py INTERPOLATIONS
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")  # what torch.device takes, plus "auto"
HARDWARE_PRESETS = ("1gpu", "2x4090")  # engine/presets.py PRESETS (partial configs laid over one by --hw)
MAX_NUMPY_SEED = 2**32 - 1  # numpy RandomState seeds (data.order_seed; data.split_seed, + label mod 2^32)

_Check = Callable[[Any], Optional[str]]  # None when the value is fine, else "must be ..."


def _number(lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
            hi_open: bool = False, optional: bool = False, why: str = "") -> _Check:
    """A finite number in the range [lo, hi] (open ends with lo_open / hi_open); None if optional. `why`:
    the reason for the range, said with the refusal."""
    if lo is not None and hi is not None:
        rng = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        rng = f"{'>' if lo_open else '>='} {lo:g}"
    else:
        rng = ""
    what = f"a finite number {rng}".strip() + (" (or null)" if optional else "")

    def check(value: Any) -> Optional[str]:
        if value is None and optional:
            return None
        ok = isinstance(value, (int, float)) and math.isfinite(value)
        ok = ok and (lo is None or (value > lo if lo_open else value >= lo))
        ok = ok and (hi is None or (value < hi if hi_open else value <= hi))
        return None if ok else f"must be {what}" + (f" ({why})" if why else "")
    return check


def _integer(lo: int = 0, hi: Optional[int] = None, optional: bool = False) -> _Check:
    what = f"an integer {'>= ' + str(lo) if hi is None else f'in [{lo}, {hi}]'}" + (" (or null)" if optional else "")

    def check(value: Any) -> Optional[str]:
        if value is None and optional:
            return None
        ok = isinstance(value, int) and value >= lo and (hi is None or value <= hi)
        return None if ok else f"must be {what}"
    return check


def _one_of(allowed: tuple) -> _Check:
    return lambda value: None if value in allowed else f"must be one of {list(allowed)}"


# what torch and other libraries call the precisions (torch.float16, AMP's "half", ...): named in the error
PRECISION_ALIASES = {"half": "fp16", "float16": "fp16", "float": "fp32", "float32": "fp32", "single": "fp32",
                     "bfloat16": "bf16", "16": "fp16", "32": "fp32"}


def _precision(value: Any) -> Optional[str]:
    said = _one_of(PRECISIONS)(value)
    spelled = str(value).lower().removeprefix("torch.")
    alias = spelled if spelled in PRECISIONS else PRECISION_ALIASES.get(spelled)
    return said if said is None or alias is None else f"{said} (for {value!r} write {alias!r})"


def _subset_of(allowed: tuple) -> _Check:
    def check(value: list) -> Optional[str]:
        if value and all(v in allowed for v in value) and len(set(value)) == len(value):
            return None
        return f"must be a non-empty list of {list(allowed)}, each at most once"
    return check


def _nonempty_str(value: Any) -> Optional[str]:
    return None if isinstance(value, str) and value.strip() else "must be a non-empty string"


def _device(value: Any) -> Optional[str]:
    if isinstance(value, str) and DEVICE_PATTERN.fullmatch(value):
        return None
    return "must be 'auto', 'cpu', 'cuda', 'cuda:<index>', 'mps' or 'xpu[:<index>]'"


def _templates(value: list) -> Optional[str]:
    if not (value and all(isinstance(t, str) and t for t in value)):
        return "must be a non-empty list of templates ('a photo of a {}.') or template set names"
    from .data.prompts import resolve_templates  # the set names live with the templates (lazy: data/ imports torch)
    try:
        resolve_templates(value)
    except ValueError as e:
        return f"is not usable: {e}"
    return None


def _task_sizes(value: Optional[list]) -> Optional[str]:
    if value is None or all(v >= 1 for v in value):
        return None
    return "must be null or a list of task sizes, each an integer >= 1"


def _preprocess(value: Any) -> Optional[str]:
    """model.preprocess: null, a pretrained tag, or a mapping of open_clip preprocess_cfg keys."""
    if value is None or (isinstance(value, str) and value.strip()):
        return None
    what = (f"must be null, a pretrained tag of model.name (e.g. 'webli'), or a mapping with any of "
            f"{list(PREPROCESS_KEYS)}")
    if not isinstance(value, dict) or not value:
        return what
    unknown = sorted(set(value) - set(PREPROCESS_KEYS))
    if unknown:
        return f"{what}; unknown key(s) {unknown}"
    for key in ("mean", "std"):
        v = value.get(key)
        if v is not None and not (isinstance(v, (list, tuple)) and len(v) == 3 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
            return f"{what}; {key} must be 3 finite numbers (one per RGB channel)"
    if value.get("std") is not None and min(value["std"]) <= 0:
        return f"{what}; std must be > 0 in every channel"
    if value.get("interpolation") is not None and value["interpolation"] not in INTERPOLATIONS:
        return f"{what}; interpolation must be one of {list(INTERPOLATIONS)}"
    if value.get("resize_mode") is not None and value["resize_mode"] not in RESIZE_MODES:
        return f"{what}; resize_mode must be one of {list(RESIZE_MODES)}"
    fill = value.get("fill_color")
    if fill is not None and not (isinstance(fill, int) and not isinstance(fill, bool) and 0 <= fill <= 255):
        return f"{what}; fill_color must be an integer in [0, 255]"
    return None


def _class_order(value: Any) -> Optional[str]:
    if isinstance(value, str) and value in CLASS_ORDERS:
        return None
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool) and v >= 0) for v in value) \
            and len(set(value)) == len(value):
        return None
    return (f"must be one of {list(CLASS_ORDERS)} or a non-empty list of class names / ids / indices (>= 0), each "
            f"at most once")


# every key with a constraint beyond its type; keys not listed here (paths, flags) are only type-checked
RULES: dict[str, _Check] = {
    "model.name": _nonempty_str,
    "model.preprocess": _preprocess,
    "lora.rank": _integer(1),
    "lora.alpha": _number(0, lo_open=True),
    "lora.targets": _subset_of(LORA_TARGETS),
    "lora.towers": _subset_of(LORA_TOWERS),
    "lora.init_seed": _integer(0, optional=True),
    "data.dataset": _one_of(DATASETS),
    "data.num_tasks": _integer(1),
    "data.task_sizes": _task_sizes,
    "data.class_order": _class_order,
    "data.order_seed": _integer(0, MAX_NUMPY_SEED),
    "data.templates": _templates,
    "data.num_workers": _integer(0),
    "data.max_train_per_class": _integer(0),  # 0 = no cap
    "data.max_test_per_class": _integer(0),
    "data.synthetic_seed": _integer(0),
    "data.synthetic_shift": _number(0, 1),
    "data.split_seed": _integer(0, MAX_NUMPY_SEED),
    "data.test_fraction": _number(0, 1, lo_open=True, hi_open=True),
    "data.official_split": _integer(1, 3),
    "data.expected_classes": _integer(0, optional=True),  # 0 / null = no check
    "dpgd.k_seed": _integer(1),
    "dpgd.k_adv": _integer(0),  # 0 = the seeds themselves
    "dpgd.gamma": _number(0, 1),  # [0,1] pixel units, as the images before normalisation
    "dpgd.eps": _number(0, 1),
    "dpgd.lambda_p": _number(0),
    "dpgd.batch_size": _integer(1),
    "acgd.weight": _number(0),  # 0 = off
    "acgd.tau": _number(0, MAX_ACGD_TAU, lo_open=True,
                        why=f"above {MAX_ACGD_TAU:g} the fp32 KL of two near-uniform softmaxes is lost to rounding"),
    "acgd.anchor_batch": _integer(0),  # 0 = the image batch
    "acgd.source": _one_of(ACGD_SOURCES),
    "tsgr.weight": _number(0),
    "tsgr.k": _integer(1),
    "tsgr.tau": _number(0, lo_open=True),
    "tsgr.reference": _one_of(TSGR_REFERENCES),
    "prototypes.beta": _number(0),  # 0 = CLIP path only (onlyclip)
    "prototypes.weight_rule": _one_of(WEIGHT_RULES),
    "optim.lr": _number(0, lo_open=True),
    "optim.momentum": _number(0, 1, hi_open=True),
    "optim.weight_decay": _number(0),
    "optim.batch_size": _integer(1),
    "optim.epochs": _integer(0),  # 0 = no training (the zeroshot variant)
    "optim.schedule": _one_of(SCHEDULES),
    "optim.warmup_steps": _integer(0),
    "optim.cls_over": _one_of(CLS_OVER),
    "optim.grad_clip": _number(0),  # 0 = off
    "optim.fused": _one_of(FUSED_SGD),
    "eval.batch_size": _integer(1),
    "run.method": _one_of(METHODS),
    "run.seed": _integer(0),
    "run.output_dir": _nonempty_str,
    "run.device": _device,
    "run.precision": _precision,
    "run.text_precision": _precision,
    "run.ops": _one_of(OPS_BACKENDS),
    "run.num_threads": _integer(0),  # 0 = torch default
    "run.max_steps_per_task": _integer(0),  # 0 = full epochs
}


def validate(cfg: Config) -> Config:
    """Check every value of `cfg` (types, choices, ranges); return cfg, type-normalised in place.

    Raises one ConfigError that lists every invalid key with its value and what it accepts.
    """
    problems = _value_problems(cfg)
    if problems:
        raise ConfigError(f"{len(problems)} invalid config value(s):\n  " + "\n  ".join(problems))
    return cfg


def _value_problems(cfg: Config) -> list[str]:
    """validate's checks: every key's type, choice and range; normalises cfg in place; the problems."""
    problems = []
    for sec_name, sec_tp in _field_types(Config).items():
        section = getattr(cfg, sec_name)
        for key, tp in _field_types(sec_tp).items():
            dotted = f"{sec_name}.{key}"
            try:
                value = _coerce(getattr(section, key), tp, dotted)
            except ConfigError as e:
                problems.append(str(e))
                continue
            if dotted == "run.output_dir" and isinstance(value, str):  # as the data paths: `~/runs/x` is home's
                value = os.path.expanduser(value)
            setattr(section, key, value)
            why = RULES[dotted](value) if dotted in RULES else None
            if why:
                problems.append(f"{dotted} {why}, got {value!r}")
    return problems


# the offline world's class count (data.synthetic.NUM_CLASSES, which imports torch: a config error loads none)
OFFLINE_WORLD_CLASSES = 100


def known_class_count(data) -> Optional[int]:
    """The classes the data will hold, where that is known before it is read: the offline world's, or
    data.expected_classes (the benchmark presets set it); None otherwise. (data.build checks the data read
    against the same count.)"""
    if data.dataset == "synthetic":
        return OFFLINE_WORLD_CLASSES
    expected = getattr(data, "expected_classes", None)
    return int(expected) if expected else None


def task_count(data: DataConfig) -> int:
    """A run's number of tasks: data.task_sizes' length where set (a stored run may hold sizes beside the default
    num_tasks: check_task_count), else data.num_tasks."""
    return len(data.task_sizes) if data.task_sizes else data.num_tasks


def check_task_count(cfg: Config) -> Config:
    """data.task_sizes, when set, defines the tasks; a new config must give num_tasks of them (a
    preset's task sizes with another num_tasks was a late, puzzling class-count error). Checked where
    users build configs (api.make_config), not on a stored run's config: runs made before this check
    may hold sizes with the default num_tasks, and they must still resume and evaluate."""
    sizes, n = cfg.data.task_sizes, cfg.data.num_tasks
    if sizes is not None and len(sizes) != n:
        # the classes the tasks split: known_class_count's (the offline world's, data.expected_classes), else the
        # sizes' sum
        total = known_class_count(cfg.data) or sum(sizes)
        even = [total // n + (1 if i < total % n else 0) for i in range(n)]  # the same classes, n tasks
        fix = (f"set data.task_sizes=null to split the {total} classes into {n} equal tasks" if total % n == 0 else
               f"e.g. data.task_sizes=[{','.join(map(str, even))}] ({total} classes do not split into {n} equal tasks)"
               if total >= n else f"{total} classes cannot make {n} tasks")
        # sizes set on purpose (they cover the classes) beside the default num_tasks, left as it was: first the
        # count that takes them as they are (a config's own num_tasks is kept: its fix is the sizes')
        fix = (f"set data.num_tasks={len(sizes)} for these sizes, or give one size per task: {fix}"
               if sum(sizes) == total and n == DataConfig().num_tasks else f"give one size per task, {fix}")
        raise ConfigError(f"data.task_sizes has {len(sizes)} entries ({sizes}) but data.num_tasks is {n}: {fix} "
                          f"(a preset such as ucf101 sets task_sizes)")
    return cfg


def check_data_root(cfg: Config) -> Config:
    """data.root with the offline world (which reads no files) is a forgotten --config <dataset>:
    refused where users build configs (api.make_config), not silently trained on synthetic images. So is a
    data.expected_classes other than the offline world's 100 classes (data.build's count check would send the
    user to a data.root the offline world does not read)."""
    if cfg.data.dataset == "synthetic" and cfg.data.root:
        raise ConfigError(f"data.root is {cfg.data.root} but data.dataset is 'synthetic', the offline world, which "
                          f"reads no files: name the dataset the root holds (--config cifar100, or --set "
                          f"data.dataset=<{'|'.join(DATASETS[1:])}>), or drop data.root")
    expected = cfg.data.expected_classes
    if cfg.data.dataset == "synthetic" and expected and int(expected) != OFFLINE_WORLD_CLASSES:
        raise ConfigError(f"data.expected_classes is {expected} but data.dataset is 'synthetic', the offline world "
                          f"of {OFFLINE_WORLD_CLASSES} classes: drop data.expected_classes (or name the dataset "
                          f"whose copy holds {expected} classes: --config <dataset> with data.root)")
    return cfg


def _merge(d: dict, base: Optional[Config] = None) -> Config:
    """A copy of base (default Config()) with the nested dict's keys set; types checked (ranges by
    validate, or here too when a key or type is wrong, so that one error lists every problem)."""
    cfg = copy.deepcopy(base) if base is not None else Config()
    sections = _field_types(Config)
    problems = []  # every unknown key and wrong type, in one error
    for sec_name, sec_val in (d or {}).items():
        if sec_name not in sections:
            problems.append(f"unknown config section '{sec_name}'; known: {sorted(sections)}")
            continue
        if sec_val is None:  # an empty section in YAML ("run:" with nothing under it): no changes
            continue
        if not isinstance(sec_val, dict):
            problems.append(f"config section '{sec_name}' must be a mapping, got {sec_val!r}")
            continue
        section = getattr(cfg, sec_name)
        types = _field_types(type(section))
        for key, val in sec_val.items():
            if key not in types:
                problems.append(f"unknown config key '{sec_name}.{key}'{did_you_mean(f'{sec_name}.{key}')}; "
                                f"known keys of '{sec_name}': {sorted(types)}")
                continue
            try:
                setattr(section, key, _coerce(val, types[key], f"{sec_name}.{key}"))
            except ConfigError as e:
                problems.append(str(e))
    if problems:  # and the range / choice problems of the keys that were set, all in one error
        problems += _value_problems(copy.deepcopy(cfg))
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} invalid config keys / values:\n  " + "\n  ".join(problems))
    return cfg


def config_from_dict(d: dict, base: Optional[Config] = None) -> Config:
    """Build a validated Config from a (possibly partial) nested dict; unknown keys are an error."""
    return validate(_merge(d, base))


def known_keys() -> list[str]:
    keys = []
    for sec_name, sec_tp in _field_types(Config).items():
        keys += [f"{sec_name}.{k}" for k in _field_types(sec_tp)]
    return keys


def did_you_mean(key: str) -> str:
    """' (did you mean optim.lr?)' for a bare or misspelled key, '' when nothing is close."""
    keys = known_keys()
    same_leaf = [k for k in keys if k.split(".", 1)[1] == key.split(".")[-1]]
    close = same_leaf or difflib.get_close_matches(key, keys, n=3, cutoff=0.75) or [
        k for k in keys if k.split(".", 1)[1] in difflib.get_close_matches(key.split(".")[-1],
                                                                           [q.split(".", 1)[1] for q in keys], n=3)]
    return f" (did you mean {' or '.join(close[:3])}?)" if close else ""


def _key_type(dotted: str) -> Any:
    """The annotated type of a dotted config key, or None for an unknown key."""
    sec, _, sub = dotted.partition(".")
    section = _field_types(Config).get(sec)
    return _field_types(section).get(sub) if section is not None else None


def config_value(cfg: Config, dotted: str) -> Any:
    """The value of a dotted key ('optim.lr') in `cfg`."""
    sec, _, sub = dotted.partition(".")
    return getattr(getattr(cfg, sec), sub)


def _override_value(key: str, text: str) -> Any:
    """A command-line value for `key`: YAML rules (parse_value), except that a string key takes the
    text as written where YAML would read something else: `-o 2024`, `data.root=off`, `-o '#x'`."""
    value = parse_value(text)
    tp = _key_type(key)
    if tp is str or tp == Optional[str]:
        keeps_null = tp is not str and text.strip() in ("null", "Null", "NULL", "~", "")
        if not isinstance(value, str) and not keeps_null:
            return text
    return value


_LEADING_ZERO_INT = re.compile(r"[+-]?0[0-9_]+")
_BASE_60 = re.compile(r"[+-]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?")


def parse_value(text: str) -> Any:
    """Parse a command-line value with YAML rules (1e-3 -> float, true -> bool, [a,b] -> list), but numbers
    as YAML 1.2 and argparse read them, not as PyYAML's YAML 1.1: "010" is 10 (1.1: octal 8, while
    `--seed 010` gave 10) and "1:30" is the text "1:30" (1.1: base 60, 90)."""
    stripped = text.strip()
    if _LEADING_ZERO_INT.fullmatch(stripped):
        return int(stripped.replace("_", ""), 10)
    # YAML 1.1 reads "1e-3" as a string; try a float first for such literals.
    try:
        if any(c in text for c in "eE") and "." not in text and text.strip().lstrip("+-")[0].isdigit():
            return float(text)
    except (ValueError, IndexError):
        pass
    if text == "":
        return ""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot read the value {text!r} (YAML syntax: {getattr(e, 'problem', None) or e}); "
                          f"quote it or close its brackets, e.g. lora.targets=[k,v]") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and _BASE_60.fullmatch(stripped):
        return stripped
    return value


def override_key(change: str) -> str:
    """The dotted key of a `section.key=value` override string ("run.device" of "run.device=cpu")."""
    return change.split("=", 1)[0].strip()


def apply_overrides(cfg: Config, overrides: list[str] | dict[str, Any]) -> Config:
    """Apply `section.key=value` overrides (strings from the CLI, or a dict of dotted keys)."""
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}' must look like section.key=value, e.g. dpgd.k_adv=5")
            key = override_key(item)
            items.append((key, _override_value(key, item.split("=", 1)[1])))
    nested: dict[str, dict] = {}
    problems = []  # every bad key in one error: the undotted ones here, the rest from config_from_dict
    for key, val in items:
        if "." not in key:
            problems.append(f"override key '{key}' must be dotted (section.key){did_you_mean(key)}")
            continue
        sec, sub = key.split(".", 1)
        nested.setdefault(sec, {})[sub] = val
    try:
        new = config_from_dict(nested, base=cfg)
    except ConfigError as e:
        if not problems:
            raise
        problems.append(str(e))
    if problems:
        raise ConfigError("; ".join(problems))
    return new


def kwargs_to_overrides(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Map flat keyword args of train(...) to dotted keys: `lr=1e-3` -> optim.lr, `k_adv` -> dpgd.k_adv.

    Dotted keys written with '__' (`dpgd__k_adv=5`) are accepted too. A bare key must be unique
    across sections, else the error lists the candidates.
    """
    out, problems = map_kwargs(kwargs)
    if problems:
        raise ConfigError("; ".join(problems))
    return out


def refuse_decided_keys(what: str, kwargs: dict[str, Any], decided: dict[str, str]) -> None:
    """Keyword overrides (`method=`, `run__seed=`, ...) of keys that `what` sets itself for every run
    (an ablation's run.method from its variants, run.seed from its seeds): an error with the fix
    (`decided`: key -> fix), not a value accepted and then overridden."""
    given = [f"{key} ({decided[key]})" for key in kwargs_to_overrides(kwargs) if key in decided]
    if given:
        raise ConfigError(f"{what} does not take {' or '.join(given)}")


def map_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """kwargs_to_overrides's mapping and its problems (unknown, ambiguous, repeated keys), not raised."""
    out, problems = {}, []
    index: dict[str, list[str]] = {}
    for full in known_keys():
        index.setdefault(full.split(".", 1)[1], []).append(full)
    for key, val in kwargs.items():
        if "__" in key:
            dotted = key.replace("__", ".", 1)
            if dotted in out:
                problems.append(f"keyword argument '{key}' sets {dotted}, which another argument sets too")
            out[dotted] = val
            continue
        cands = index.get(key, [])
        if len(cands) == 1:
            if cands[0] in out:
                problems.append(f"keyword argument '{key}' sets {cands[0]}, which another argument sets too")
            out[cands[0]] = val
        elif not cands:
            close = difflib.get_close_matches(key, list(index), n=3, cutoff=0.7)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            problems.append(f"unknown keyword argument '{key}' ({hint}a config key as section__key, e.g. "
                            f"dpgd__k_adv, or a unique key name)")
        else:
            problems.append(f"keyword argument '{key}' is ambiguous: it is {' and '.join(cands)}; write it as "
                            f"{' or '.join(c.replace('.', '__') for c in cands)}")
    return out, problems


PRESET_DIR = Path(__file__).parent / "configs"


def preset_names() -> list[str]:
    """Names of the YAML presets shipped in segpcl_fast/configs (cifar100, 1gpu, ...)."""
    return sorted(q.stem for q in PRESET_DIR.glob("*.yaml"))


def _presets_text() -> str:
    """The shipped presets as an error message lists them: configs, then the hardware ones (--hw)."""
    names = preset_names()
    configs = [n for n in names if n not in HARDWARE_PRESETS]
    hardware = [n for n in names if n in HARDWARE_PRESETS]
    return f"{configs}" + (f"; hardware presets for --hw: {hardware}" if hardware else "")


def _preset_path(name: str) -> Optional[Path]:
    """configs/<name>.yaml when `name` is a bare preset name ("cifar100" or "cifar100.yaml")."""
    if not name or "/" in name or os.sep in name:
        return None
    candidate = PRESET_DIR / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    return candidate if candidate.is_file() else None


def _find_config(path: str | os.PathLike, relative_to: Optional[Path] = None) -> Path:
    """The YAML file `path` names: a file (relative to `relative_to` when given), else a preset name."""
    p = Path(path)
    if relative_to is not None and not p.is_absolute():
        p = relative_to / p
    if p.is_dir():
        listed = sorted(q.name for q in p.glob("*.y*ml"))
        raise ConfigError(f"config path '{p}' is a directory, not a YAML file"
                          + (f"; YAML files in it: {listed}" if listed else "")
                          + f" (presets: {_presets_text()})")
    if p.is_file():
        return p
    preset = _preset_path(str(path))
    if preset is not None:
        return preset
    is_name = "/" not in str(path) and os.sep not in str(path)
    raise ConfigError(f"config file '{p}' does not exist" + (" and is not a preset name" if is_name else "")
                      + f"; give a YAML file or one of the presets {_presets_text()}")


def _read_yaml(p: Path) -> dict:
    try:
        with open(p) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and context_mark is not None:
            problem += f" ({context} at line {context_mark.line + 1})"
        raise ConfigError(f"config file '{p}' is not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file '{p}': {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping of sections, got {type(data).__name__}")
    return data


def _load_chain(p: Path, chain: tuple[Path, ...]) -> Config:
    """Config of file p over its `base:` (resolved against p's folder, or a preset name)."""
    here = p.resolve()
    if here in chain:
        cycle = " -> ".join(str(q) for q in (*chain[chain.index(here):], here))
        raise ConfigError(f"config 'base:' cycle: {cycle}; remove one of these base: lines")
    data = _read_yaml(p)
    base_name = data.pop("base", None)
    base = None
    if base_name is not None:
        if not isinstance(base_name, str) or not base_name:
            raise ConfigError(f"config file '{p}': base must be a file path or preset name, got {base_name!r}")
        try:
            base_path = _find_config(base_name, relative_to=p.parent)
        except ConfigError as e:
            raise ConfigError(f"config file '{p}', base {base_name!r}: {e}") from None
        base = _load_chain(base_path, (*chain, here))
    try:
        return _merge(data, base)
    except ConfigError as e:
        raise ConfigError(f"config file '{p}': {e}") from None


def keys_set_by_user_file(path: Optional[str | os.PathLike]) -> set[str]:
    """The dotted keys a user's config file and the user files it names as `base:` set themselves (not a
    packaged preset's: configs/*.yaml); empty for None or a preset name."""
    keys: set[str] = set()
    p = None if path is None else _find_config(path)
    seen: set[Path] = set()
    while p is not None and p.resolve().parent != PRESET_DIR.resolve() and p.resolve() not in seen:
        seen.add(p.resolve())
        data = _read_yaml(p)
        keys |= {f"{section}.{key}" for section, values in data.items() if isinstance(values, dict) for key in values}
        base = data.get("base")
        p = _find_config(base, relative_to=p.parent) if isinstance(base, str) and base else None
    return keys


def check_resume_dir(cfg: Config) -> None:
    """--resume of an output dir that does not exist is an error (a typo would start it all again): train and
    the analyses that keep runs (ablate, sweep, retention, distill-sources) ask it before any run."""
    out = Path(cfg.run.output_dir)
    if cfg.run.resume and cfg.run.overwrite:  # the overwrite was dropped without a word (a review's finding)
        raise ConfigError(f"run.resume (--resume) and run.overwrite=true contradict each other: resuming continues "
                          f"what {out} holds, run.overwrite replaces it; drop one of them")
    if cfg.run.resume and out.exists() and not out.is_dir():
        raise ConfigError(f"run.resume is set but {out} is a file, not a folder: give -o (run.output_dir) the "
                          "folder the run (or the analysis) wrote, not a file in it")
    if cfg.run.resume and not out.is_dir():
        raise ConfigError(f"run.resume is set but {out} does not exist: check run.output_dir (-o), or drop "
                          f"--resume to start a new run there")


def check_resume_run(cfg: Config) -> None:
    """check_resume_dir for one run (train): also refuses a folder that is not a run but holds runs
    (an analysis' <variant>/seed<N>/ folders): resuming it would start a fresh run among them."""
    check_resume_dir(cfg)
    out = Path(cfg.run.output_dir)
    below = runs_below(out) if out.is_dir() and not (out / "config.yaml").is_file() else []
    if below and cfg.run.resume:
        raise ConfigError(f"run.resume is set but {out} is not a run (no config.yaml); it holds runs: "
                          f"{join_some(below)}: resume one of them (-o {below[0]}), or the analysis that made them")
    if below:  # an analysis' folder: a run started there would put its files among the analysis' runs
        raise ConfigError(f"{out} holds an analysis' runs ({join_some(below)}): a new run there would write its "
                          f"files among them; give it its own folder (-o {str(out).rstrip('/')}-train)")


def preset_output_dirs() -> set[str]:
    """The run.output_dir each shipped preset sets (runs/cifar100, ...): train's folders by default."""
    dirs = set()
    for name in preset_names():
        run = (_read_yaml(PRESET_DIR / f"{name}.yaml") or {}).get("run") or {}
        if isinstance(run.get("output_dir"), str):
            dirs.add(run["output_dir"])
    return dirs


def analysis_config(cfg: Config, name: str) -> Config:
    """An analysis' config: its runs go in their own folder. The offline default run.output_dir
    (runs/default, train's) becomes runs/<name>, a preset's (runs/cifar100) runs/cifar100-<name>; a
    folder that is a train run (it holds config.yaml) is refused, as the analysis would write its runs
    and files among that run's."""
    if cfg.run.output_dir == RunConfig().output_dir:
        cfg = apply_overrides(cfg, {"run.output_dir": f"runs/{name}"})
    elif cfg.run.output_dir in preset_output_dirs():
        cfg = apply_overrides(cfg, {"run.output_dir": f"{cfg.run.output_dir}-{name}"})
    out = Path(cfg.run.output_dir)
    if (out / "config.yaml").is_file():
        raise ConfigError(f"{out} is a train run's folder (it holds config.yaml): {name} would write its runs and "
                          f"files among that run's; give it its own folder (-o {str(out).rstrip('/')}-{name})")
    seeds = seed_runs(out)
    if seeds:  # ablate -o <a sweep's point folder>: its <variant>/seed<N>/ beside the point's seed<N>/ runs
        beside = f"{os.path.dirname(os.path.abspath(out))}-{name}"
        raise ConfigError(f"{out} holds the runs of one variant or point of another analysis ({join_some(seeds)}): "
                          f"{name} would write its runs and files among them; give it its own folder (-o {beside})")
    return cfg


def seed_runs(folder: str | os.PathLike) -> list[str]:
    """The seed<N>/ runs (with a config.yaml) right in `folder`: the folder is one variant or point of an
    analysis (<out>/<variant>/seed<N>/ of ablate and distill-sources, <out>/<point>/seed<N>/ of sweep)."""
    try:
        found = [p.parent.name for p in Path(folder).glob("seed*/config.yaml")]
    except OSError:  # an entry gone while listed: the run's own checks name the folder
        return []
    return sorted(n for n in found if n[4:].lstrip("-").isdigit())


def runs_below(folder: str | os.PathLike) -> list[str]:
    """Run directories (with a config.yaml) one or two levels below `folder` (an ablation's
    <variant>/seed<N>/), for an error about a folder that is not a run; not a walk of a whole tree."""
    found = []
    for depth in ("*", "*/*"):
        try:
            found += [str(p.parent) for p in Path(folder).glob(f"{depth}/config.yaml")]
        except OSError:  # an entry gone while listed (-o /proc): the run's own checks name the folder
            pass
    return sorted(found)


def join_some(items: list[str], limit: int = 3) -> str:
    """'a, b, c and 4 more': the first `limit` items, and how many are left out."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def load_config(path: str | os.PathLike, overrides: Optional[list[str]] = None) -> Config:
    """Load YAML (partial configs fine), validated. `path` may also be a preset name in configs/
    (e.g. cifar100). A `base:` key names another YAML (relative to this file's folder) or a preset
    whose values this file's keys override."""
    p = _find_config(path)
    cfg = _load_chain(p, ())
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"config file '{p}': {e}") from None
    return apply_overrides(cfg, overrides) if overrides else cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    atomic_write_text(path, dump_config(cfg))
