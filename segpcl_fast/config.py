"""Configuration: one dataclass per concern, every default of ../shared/method.md lives here.

Ground floor: imports nothing from the rest of the package.

    cfg = Config()                              # method.md defaults, offline world
    cfg = load_config("configs/cifar100.yaml")  # YAML, partial: missing keys keep defaults
    cfg = apply_overrides(cfg, ["dpgd.k_adv=5", "optim.lr=3e-4"])
    save_config(cfg, "run/config.yaml")

Fields marked [choice] are ours where the paper is silent (method.md says so too).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the fix."""


@dataclass
class ModelConfig:
    # open_clip model name (e.g. "ViT-B-16") and pretrained tag ("openai") or a local file path.
    # Default: the tiny CLIP shipped with the package, pretrained on the offline synthetic world.
    name: str = "segpcl-tiny"
    pretrained: Optional[str] = "segpcl-world"
    cache_dir: Optional[str] = None


@dataclass
class LoRAConfig:
    rank: int = 32
    alpha: float = 32.0  # [choice] scaling alpha / rank = 1
    targets: list[str] = field(default_factory=lambda: ["k", "v", "c_fc", "c_proj"])  # [choice]
    towers: list[str] = field(default_factory=lambda: ["visual", "text"])
    init_seed: int = 0  # seed for the frozen Kaiming-uniform A matrices


@dataclass
class DataConfig:
    # "synthetic" (offline world), "cifar100", "imagenet-r", "imagenet-subset", "cub200", "ucf101"
    dataset: str = "synthetic"
    root: Optional[str] = None
    num_tasks: int = 10
    task_sizes: Optional[list[int]] = None  # explicit classes per task (e.g. UCF101: [11, 10, ...])
    # "seeded" shuffles class ids with order_seed (1993: PyCIL's np.random.seed(1993) permutation,
    # also RAPF's ImageNet-100 order; RAPF's other orders are explicit lists); "natural" keeps
    # the dataset's order; or an explicit list of class names / indices.
    class_order: Any = "seeded"
    order_seed: int = 1993
    templates: list[str] = field(default_factory=lambda: ["a good photo of a {}."])  # [choice]
    train_augment: bool = True
    num_workers: int = 0
    # optional cap on training images per class (0 = all); handy for smoke runs
    max_train_per_class: int = 0
    max_test_per_class: int = 0
    synthetic_seed: int = 0  # the offline world is generated from this seed
    # how far the offline world's continual-learning domain is from the pretraining domain
    # (0 = source-like style, 1 = full shift); default synthetic.SHIFT_STRENGTH (RESULTS.md)
    synthetic_shift: float = 0.35
    # format-specific options (see segpcl_fast/data/*.py)
    names_file: Optional[str] = None  # wnid -> name mapping (ImageNet-R README.txt, LOC_synset_mapping.txt, JSON)
    class_list: Optional[str] = None  # ImageNet-Subset: file of wnids (default <root>/imagenet100.txt)
    frames_dir: Optional[str] = None  # UCF101: folder of middle frames / frame folders (auto-detected)
    split_seed: int = 0  # ImageNet-R: seeded per-class train/test split when no split files exist
    test_fraction: float = 0.2  # ImageNet-R: test share of the seeded split
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
    eps: float = 8.0 / 255.0  # [choice] L_inf radius, [0,1] pixel units
    lambda_p: float = 1.0  # [choice] weight of the raw-prototype (visual anchoring) term
    random_start: bool = False  # [choice]
    batch_size: int = 64  # anchors per PGD batch (memory knob only; results do not depend on it)


@dataclass
class ACGDConfig:
    enabled: bool = True
    weight: float = 5.0  # lambda_ACGD
    tau: float = 20.0  # tau_A
    anchor_batch: int = 0  # anchors per step; 0 = same as the image batch [choice]
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


@dataclass
class PrototypeConfig:
    transfer: bool = True  # anchor-induced drift transfer of old prototypes
    beta: float = 0.5  # weight of the visual (prototype) path at inference; 0 = onlyCLIP
    weight_rule: str = "relu_cos"  # [choice] w_a,c = max(0, cos(r_T(x_a), p_c))


@dataclass
class OptimConfig:
    lr: float = 1e-3
    momentum: float = 0.9  # [choice]
    weight_decay: float = 0.0
    batch_size: int = 128
    epochs: int = 10
    schedule: str = "cosine"  # "cosine" over the task's steps, or "constant"
    warmup_steps: int = 0
    cls_over: str = "current"  # [choice] L_cls over "current" task classes or all "seen" classes
    grad_clip: float = 0.0  # 0 = off
    fused: str = "auto"  # SGD implementation: "auto" (apex > torch fused > foreach), "foreach", "apex"


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
    precision: str = "fp32"  # "fp32" or "bf16" (autocast)
    compile: bool = False  # torch.compile the student step
    ops: str = "auto"  # fused-op backend: "auto", "reference", "triton", "cpp"
    num_threads: int = 0  # torch CPU threads; 0 = torch default
    checkpoint: bool = True  # checkpoint after every task
    resume: bool = False
    progress: bool = True  # tqdm bars
    plots: bool = True
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
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value] if args else value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        return value
    return value


def config_from_dict(d: dict, base: Optional[Config] = None) -> Config:
    """Build a Config from a (possibly partial) nested dict; unknown keys are an error."""
    cfg = copy.deepcopy(base) if base is not None else Config()
    sections = _field_types(Config)
    for sec_name, sec_val in (d or {}).items():
        if sec_name not in sections:
            raise ConfigError(f"unknown config section '{sec_name}'; known: {sorted(sections)}")
        if not isinstance(sec_val, dict):
            raise ConfigError(f"config section '{sec_name}' must be a mapping, got {sec_val!r}")
        section = getattr(cfg, sec_name)
        types = _field_types(type(section))
        for key, val in sec_val.items():
            if key not in types:
                raise ConfigError(
                    f"unknown config key '{sec_name}.{key}'; known keys of '{sec_name}': {sorted(types)}")
            setattr(section, key, _coerce(val, types[key], f"{sec_name}.{key}"))
    return cfg


def known_keys() -> list[str]:
    keys = []
    for sec_name, sec_tp in _field_types(Config).items():
        keys += [f"{sec_name}.{k}" for k in _field_types(sec_tp)]
    return keys


def parse_value(text: str) -> Any:
    """Parse a command-line value with YAML rules (1e-3 -> float, true -> bool, [a,b] -> list)."""
    # YAML 1.1 reads "1e-3" as a string; try a float first for such literals.
    try:
        if any(c in text for c in "eE") and "." not in text and text.strip().lstrip("+-")[0].isdigit():
            return float(text)
    except (ValueError, IndexError):
        pass
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(cfg: Config, overrides: list[str] | dict[str, Any]) -> Config:
    """Apply `section.key=value` overrides (strings from the CLI, or a dict of dotted keys)."""
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}' must look like section.key=value, e.g. dpgd.k_adv=5")
            key, text = item.split("=", 1)
            items.append((key.strip(), parse_value(text)))
    nested: dict[str, dict] = {}
    for key, val in items:
        if "." not in key:
            raise ConfigError(f"override key '{key}' must be dotted (section.key); known: {', '.join(known_keys())}")
        sec, sub = key.split(".", 1)
        nested.setdefault(sec, {})[sub] = val
    return config_from_dict(nested, base=cfg)


def kwargs_to_overrides(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Map flat keyword args of train(...) to dotted keys: `lr=1e-3` -> optim.lr, `k_adv` -> dpgd.k_adv.

    Dotted keys written with '__' (`dpgd__k_adv=5`) are accepted too. A bare key must be unique
    across sections, else the error lists the candidates.
    """
    out = {}
    index: dict[str, list[str]] = {}
    for full in known_keys():
        index.setdefault(full.split(".", 1)[1], []).append(full)
    for key, val in kwargs.items():
        if "__" in key:
            out[key.replace("__", ".", 1)] = val
            continue
        cands = index.get(key, [])
        if len(cands) == 1:
            out[cands[0]] = val
        elif not cands:
            raise ConfigError(f"unknown train() argument '{key}'; use a config key such as "
                              f"dpgd__k_adv or one of: {', '.join(sorted(index))}")
        else:
            raise ConfigError(f"train() argument '{key}' is ambiguous: {cands}; write it as "
                              f"{cands[0].replace('.', '__')}")
    return out


def load_config(path: str | os.PathLike, overrides: Optional[list[str]] = None) -> Config:
    """Load YAML (partial configs fine). `path` may also be a preset name in configs/ (e.g. cifar100)."""
    p = Path(path)
    if not p.exists():
        preset = Path(__file__).parent / "configs" / f"{path}.yaml"
        if preset.exists():
            p = preset
        else:
            raise ConfigError(f"config file '{path}' not found (nor a preset of that name in "
                              f"{preset.parent}: {sorted(q.stem for q in preset.parent.glob('*.yaml'))})")
    with open(p) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping of sections")
    base_name = data.pop("base", None)
    base = load_config(base_name) if base_name else None
    cfg = config_from_dict(data, base=base)
    return apply_overrides(cfg, overrides) if overrides else cfg


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    atomic_write_text(path, dump_config(cfg))
