"""A trained run as an image classifier over the classes it has seen (method.md, "Inference").

    clf = segpcl_fast.load_classifier("runs/c100")          # the run's last finished task
    clf.predict(["cat.jpg", "dir/dog.png"], topk=5)         # [[("tabby cat", 0.91), ...], ...]
    clf.logits(images)                                      # (B, C_seen) dual-path logits
    clf.export("c100_model.pt")                             # LoRA merged: plain open_clip weights
    clf = segpcl_fast.load_classifier("c100_model.pt")      # the same classifier, from the export

Logits are the dual path l(x, c) = s cos(v_S(x), u_S,c) + beta s cos(r_S(x), p_c) of the checkpointed
state (LoRA B, prototypes, cached text embeddings), the same function evaluation uses; inputs that
are not tensors go through the run's CLIP test transform.

The export is one torch file: `state_dict` holds the open_clip model's weights with every LoRA
adapter folded in (W + s B A, model.lora.merge_lora), so plain open_clip runs the CLIP path of the
continual model with no segpcl_fast import:

    ckpt = torch.load("c100_model.pt", weights_only=True)
    if open_clip.get_model_config(ckpt["model_name"]) is None:  # a config open_clip does not ship (segpcl-tiny)
        folder = tempfile.mkdtemp()                               # the export carries it: register it
        Path(folder, ckpt["model_name"] + ".json").write_text(json.dumps(ckpt["model_config"]))
        open_clip.add_model_config(folder)
    model = open_clip.create_model(ckpt["model_name"], force_quick_gelu=ckpt.get("quick_gelu", False))
    model.load_state_dict(ckpt["state_dict"]); model.eval()
    raw = []  # r(x), the prototype path's feature: ln_post of the CLS token, before the projection
    hook = model.visual.ln_post.register_forward_hook(lambda module, args, out: raw.append(out[:, 0]))
    emb = model.encode_image(x); hook.remove()  # x: images through the transform image_stats describes
    s, beta, p = ckpt["logit_scale"], ckpt["beta"], F.normalize(ckpt["prototypes"], dim=-1)
    logits = s * F.normalize(emb, dim=-1) @ ckpt["text"].T + beta * s * F.normalize(raw[0], dim=-1) @ p.T

(open_clip's "No pretrained weights loaded" warning is expected: the weights come from the export. `quick_gelu`:
the model ran QuickGELU, OpenAI's activation, which open_clip's config for a name such as ViT-B-16 does not set.)
The hook is for open_clip's own ViT with CLS pooling, its default. For a timm image tower (SigLIP,
EVA, PE) r(x) is the trunk's pooled feature: `raw = [model.visual.trunk.forward_head(
model.visual.trunk.forward_features(x), pre_logits=True)]` (segpcl_fast: CLIPModel.raw_features).
`text` is u_S (normalised), `prototypes` p_c, `class_names` the logit columns' classes and
`image_stats` the transform (size, mean, std).
"""
from __future__ import annotations

import copy
import dataclasses
import io
import logging
import os
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import yaml

from .config import ConfigError, apply_overrides, config_from_dict, join_some, override_key, runs_below
from .data.imagefolder import EXTENSIONS as IMAGEFOLDER_EXTENSIONS
from .data.transforms import clip_test_transform
from .fileio import DamagedFileError, UnsafeFileError, load_torch_file, save_torch_file, unwritable_dir_reason
from .method.learner import reference_image_embeddings, same_reference
from .method.prototypes import dual_path_logits
from .model.clip import CLIPModel, ImageStats, model_from_state_dict
from .model.lora import load_lora_state_dict, merge_lora
from .version import __version__

log = logging.getLogger("segpcl_fast.classifier")

EXPORT_FORMAT = "segpcl_fast.classifier/1"
PathLike = Union[str, os.PathLike]


class ClassifierError(RuntimeError):
    """A run, checkpoint or export that cannot become a classifier; the message says what to do."""


@dataclass
class ContinualClassifier:
    """The continual model after some task: CLIP with its LoRA state, text cache and prototypes."""

    model: CLIPModel
    class_names: list[str]  # the seen classes, in the run's class order (index = logit column)
    text: torch.Tensor  # (C, e) u_S, normalised: the text embeddings cached after the task
    prototypes: torch.Tensor  # (C, D) p_c, raw-feature prototypes
    beta: float  # weight of the prototype path (0 = CLIP path only)
    task: int  # tasks learned (1-based)
    _warned_unnormalised: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        n = len(self.class_names)
        if self.text.shape[0] != n or self.prototypes.shape[0] != n:
            raise ClassifierError(f"{n} class names but {self.text.shape[0]} text embeddings and "
                                  f"{self.prototypes.shape[0]} prototypes: one row per seen class is needed")
        stats = self.model.image_stats
        self.transform = clip_test_transform(stats.size, stats.mean, stats.std, **stats.geometry())

    def __repr__(self) -> str:  # not the dataclass's: that prints the whole model and every tensor
        return (f"ContinualClassifier(model={self.model.name!r}, task={self.task}, classes={len(self.class_names)}, "
                f"beta={self.beta}, device={self.device})")

    @property
    def device(self) -> torch.device:
        return self.text.device

    def to(self, device: Union[str, torch.device]) -> "ContinualClassifier":
        self.model.to(device)
        self.text, self.prototypes = self.text.to(device), self.prototypes.to(device)
        return self

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C) dual-path logits of a batch already through `self.transform` (B, 3, H, W), without autograd.
        (No decorator here: the ToTensor warning's stacklevel counts this frame as the caller's next.)"""
        self._check_batch(images, "logits()")
        self._warn_if_unnormalised(images, "logits()")
        return self._logits(images)

    def _warn_if_unnormalised(self, images: torch.Tensor, who: str) -> None:
        """Once: a batch the caller made with every value in [0, 1], which looks like ToTensor() output. Not for
        batches predict() made itself (a low-contrast image normalises into [0, 1] too)."""
        if not self._warned_unnormalised and images.numel() and images.min() >= 0 and images.max() <= 1:
            self._warned_unnormalised = True  # CLIP-normalised images are practically always partly negative
            warnings.warn(f"{who} got a batch with every value in [0, 1]: it looks like ToTensor() output, not "
                          "normalised by clf.transform (the CLIP mean and std); predictions on it are poor. Pass "
                          "clf.transform(image) per image, or paths / PIL images to predict()", stacklevel=3)

    @torch.no_grad()
    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[0] == 0:
            return torch.empty(0, len(self.class_names), device=self.device, dtype=torch.float32)
        self.model.eval()
        # fp32 in, as the transform gives it; the image tower then runs at the run's precision
        raw, emb = self.model.encode_image(images.to(self.device, torch.float32))
        return dual_path_logits(emb, raw, self.text, self.prototypes, self.model.logit_scale(), self.beta)

    def _check_batch(self, images, who: str) -> None:
        """A (B, 3, size, size) tensor (what self.transform gives, stacked), else one error with the fix."""
        size = self.model.image_stats.size
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"{who} takes a (B, 3, {size}, {size}) tensor already through clf.transform, got "
                            f"{type(images).__name__}; predict() takes paths, folders and PIL images, "
                            f"clf.load_images(...) turns them into such a batch")
        if not images.is_floating_point():
            raise TypeError(f"{who}: a {images.dtype} batch; the model takes float images through clf.transform "
                            f"(scaled and normalised), or pass paths or PIL images to predict()")
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (size, size):
            raise ValueError(f"{who}: images of shape {tuple(images.shape)}, the model takes (B, 3, {size}, {size}) "
                             f"(its test transform's output); pass paths or PIL images to predict(), or "
                             f"clf.transform each image first")

    @staticmethod
    def image_items(images, who: str = "load_images()") -> list:
        """Paths, folders (their image files, sorted), PIL images and encoded image files' bytes, one alone or
        in a list, as a flat list of path strings, PIL images and bytes. Bytes holding no NUL are a path (as
        Python's os functions take them, decoded by os.fsdecode); bytes with one are an encoded image (a PNG,
        JPEG, GIF, BMP, TIFF or WebP header holds a NUL, and no path can)."""
        from PIL import Image
        if type(images).__module__ == "numpy":
            raise TypeError(f"{who} got a numpy array: pass PIL images (PIL.Image.fromarray(a) per HxWx3 uint8 image), "
                            "paths, or a (B, 3, H, W) tensor already through clf.transform")
        if isinstance(images, (str, bytes, bytearray, os.PathLike, Image.Image)):
            images = [images]
        return [p for item in images for p in (image_paths([item]) if _is_path(item) else [item])]

    def load_images(self, images) -> torch.Tensor:
        """Paths, folders, PIL images or encoded images' bytes (one alone, or a list; as image_items takes them)
        -> one transformed batch (B, 3, S, S); no images give a (0, 3, S, S) batch."""
        batch = [self._load_one(item) for item in self.image_items(images)]
        if not batch:
            size = self.model.image_stats.size
            return torch.empty(0, 3, size, size)
        return torch.stack(batch)

    def _load_one(self, item) -> torch.Tensor:
        """One image path or PIL image (an item of `image_items`) through the transform."""
        from PIL import Image

        from .data.base import DatasetFormatError, as_8bit, read_rgb
        if _is_path(item):
            path = Path(_path_str(item))
            if not path.is_file():
                raise FileNotFoundError(f"image {path} does not exist")
            try:
                item = read_rgb(path)  # the datasets' reader: every PIL failure, one error
            except DatasetFormatError as e:
                raise ClassifierError(f"{path} cannot be read as an image ({e.__cause__!r})") from e.__cause__
        elif isinstance(item, (bytes, bytearray)):  # an encoded image file's contents (image_items)
            try:
                item = read_rgb(io.BytesIO(item))
            except DatasetFormatError as e:
                raise ClassifierError(f"{len(item)} bytes starting {bytes(item[:8])!r} cannot be decoded as an image "
                                      f"({e.__cause__!r})") from e.__cause__
        elif isinstance(item, Image.Image):
            item = as_8bit(item).convert("RGB")  # as read_rgb reads a file (16-bit grayscale scaled)
        else:
            raise TypeError(f"predict() takes image paths, folders, PIL images, encoded images' bytes or a (B, 3, H, W) "
                            f"tensor (through clf.transform), got a list holding {type(item).__name__}")
        return self.transform(item)

    def predict(self, images: Union[torch.Tensor, Sequence, PathLike], topk: int = 1,
                batch_size: int = 64, skip_unreadable: bool = False) -> list[Optional[list[tuple[str, float]]]]:
        """Per image, the top-k (class name, softmax probability over the seen classes).

        images: a list of image paths, folders (their image files, sorted), PIL images and encoded image
        files' bytes (an upload's contents), one such item alone, or a (B, 3, H, W) tensor already through
        `self.transform`. One list per image.
        skip_unreadable: a file that cannot be read as an image gives None in its place (and a logged
        warning) instead of stopping the whole call with a ClassifierError.
        """
        for name, value in (("topk", topk), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if isinstance(images, torch.Tensor):
            self._check_batch(images, "predict()")
            self._warn_if_unnormalised(images, "predict()")
        else:
            images = self.image_items(images, "predict()")
        topk = min(topk, len(self.class_names))
        results = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            readable = list(range(len(chunk)))
            if isinstance(chunk, torch.Tensor):
                batch = chunk
            elif skip_unreadable:
                loaded = [self._load_or_none(item) for item in chunk]
                readable = [k for k, x in enumerate(loaded) if x is not None]
                batch = torch.stack([loaded[k] for k in readable]) if readable else None
            else:  # chunk: image_items already expanded the folders
                batch = torch.stack([self._load_one(item) for item in chunk])
            top = [None] * len(chunk)
            if readable:
                values, indices = self._logits(batch).float().softmax(dim=-1).topk(topk, dim=-1)
                for k, vs, js in zip(readable, values.tolist(), indices.tolist()):
                    top[k] = [(self.class_names[j], float(v)) for v, j in zip(vs, js)]
            results += top
        return results

    def _load_or_none(self, item) -> Optional[torch.Tensor]:
        """One transformed image, or None (logged) when the file cannot be read as an image."""
        try:
            return self._load_one(item)
        except ClassifierError as e:
            log.warning("skipped: %s", e)
            return None

    def export(self, path: PathLike) -> Path:
        """Write the classifier with LoRA merged into the weights (plain open_clip), atomically."""
        check_export_path(path)
        from .api import random_streams_kept
        with random_streams_kept():  # merge_lora's new nn.Linear / MultiheadAttention draw their (replaced) init
            merged = copy.deepcopy(self.model).cpu()
            merge_lora(merged)
        stats, autocast = self.model.image_stats, self.model.image_autocast
        import open_clip
        config = copy.deepcopy(getattr(self.model, "carried_config", None) or open_clip.get_model_config(self.model.name))
        quick_gelu = self.model.quick_gelu  # OpenAI's weights under a GELU name: the model is rebuilt with QuickGELU
        if quick_gelu and config is not None:
            config["quick_gelu"] = True
        payload = {"format": EXPORT_FORMAT, "segpcl_fast_version": __version__, "model_name": self.model.name,
                   "model_config": config, "quick_gelu": quick_gelu,
                   "pretrained": self.model.pretrained, "state_dict": merged.clip.state_dict(),
                   "class_names": list(self.class_names), "text": self.text.detach().float().cpu(),
                   "prototypes": self.prototypes.detach().float().cpu(), "beta": float(self.beta),
                   "logit_scale": float(self.model.logit_scale().detach()), "task": self.task,
                   "image_autocast": None if autocast is None else str(autocast).removeprefix("torch."),
                   "image_stats": {"size": stats.size, "mean": list(stats.mean), "std": list(stats.std), **stats.geometry()}}
        return save_torch_file(payload, path)

    def save_peft_adapter(self, directory: PathLike) -> Path:
        """Write the LoRA adapters as a peft adapter directory (adapter_config.json,
        adapter_model.safetensors, and segpcl_base_model.json naming the open_clip model it goes on),
        atomically: `peft.PeftModel.from_pretrained(segpcl_fast.load_model(name, pretrained).clip, directory)`
        is this model's open_clip model (model/peft_adapter.py; random weights, pretrained None: after
        torch.manual_seed(self.model.weights_seed), as segpcl_base_model.json's load_with says). The class names, text embeddings and
        prototypes are not in it: `export` writes those."""
        from .model.peft_adapter import check_adapter_directory, save_peft_adapter
        try:
            check_adapter_directory(directory)  # a path that cannot take it: one ClassifierError, as export's
        except (OSError, ValueError) as e:
            raise ClassifierError(str(e)) from e
        try:
            return save_peft_adapter(self.model, directory)
        except (ImportError, NotImplementedError, ValueError) as e:  # no peft, an arrangement peft cannot take
            raise ClassifierError(str(e)) from e
        except OSError as e:  # a full disk, a file size limit: nothing is left at `directory`
            raise ClassifierError(f"could not write the adapter {directory}: {e.strerror or e} (nothing was left "
                                  f"there)") from e


def check_export_path(path: PathLike) -> None:
    """One ClassifierError before any work when `path` cannot or must not take an export: empty, a
    folder, a run's own checkpoint, or a folder that cannot be written."""
    if not os.fspath(path).strip():
        raise ClassifierError("export needs a file path, e.g. model.pt; got an empty one")
    from .engine.checkpoint import CHECKPOINT_DIR, RUN_LOCK
    from .report.run_report import REPORT_FILES
    run_files = {"config.yaml", RUN_LOCK, *REPORT_FILES}  # what a run keeps beside its checkpoints/
    path = Path(path)
    if path.is_dir():
        raise ClassifierError(f"{path} is a folder: export writes one file, e.g. {path / 'model.pt'}")
    if path.parent.name == CHECKPOINT_DIR and (path.parent.parent / "config.yaml").is_file():
        raise ClassifierError(f"{path} is in the checkpoints/ folder of the run {path.parent.parent}: an export "
                              f"there would replace or pass for a training checkpoint; write it elsewhere")
    if path.name in run_files and (path.parent / "config.yaml").is_file():
        raise ClassifierError(f"{path} is the run's own {path.name} ({path.parent} holds a run): an export there would "
                              f"replace it; write it elsewhere, e.g. {path.parent / 'model.pt'}")
    from .data.files import is_image_name
    if is_image_name(path):  # load_classifier takes such a name for an image, not a model
        raise ClassifierError(f"{path} is named as an image: export writes a torch file, e.g. "
                              f"{path.with_suffix('.pt')}")
    reason = unwritable_dir_reason(path.parent)
    if reason:
        raise ClassifierError(f"cannot write {path}: {reason}")


# a folder's images: torchvision ImageFolder's extensions (data.dataset=imagefolder's) and GIF, any case
FOLDER_IMAGE_EXTENSIONS = (*IMAGEFOLDER_EXTENSIONS, ".gif")


def _is_path(item) -> bool:
    """A path: a str, an os.PathLike, or bytes / bytearray with no NUL (with one: an encoded image)."""
    return isinstance(item, (str, os.PathLike)) or (isinstance(item, (bytes, bytearray)) and b"\0" not in item)


def _path_str(item) -> str:
    """A path item (_is_path) as a str (os.fsdecode; it takes no bytearray)."""
    return os.fsdecode(bytes(item) if isinstance(item, bytearray) else item)


def image_paths(items: Sequence[PathLike]) -> list[str]:
    """Files as given (str); folders expanded to their image files (FOLDER_IMAGE_EXTENSIONS, not hidden; sorted,
    not recursive)."""
    from .data.files import is_image_name
    paths = []
    for item in items:
        path = Path(_path_str(item))
        if path.is_dir():
            found = sorted(str(p) for p in path.iterdir() if is_image_name(p, FOLDER_IMAGE_EXTENSIONS) and p.is_file())
            if not found:  # a folder of class folders (an ImageFolder split): a folder's own images are read
                subfolders = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
                raise FileNotFoundError(
                    f"folder {path} holds no image files ({', '.join(FOLDER_IMAGE_EXTENSIONS)})"
                    + (f" of its own, only folders ({', '.join(subfolders[:3])}{', ...' if len(subfolders) > 3 else ''}):"
                       f" a folder's images are read, not its subfolders'; pass those folders instead, e.g. "
                       f"{path / subfolders[0]}" if subfolders else ""))
            paths += found
        else:
            paths.append(_path_str(item))
    return paths


# where a run's pretrained weights now lie (the same weights: checked against the stored reference
# text embeddings); model.pretrained only when the run named a file (a moved file, not other weights)
CLASSIFIER_OVERRIDABLE = ("model.cache_dir", "model.pretrained")


def load_classifier(source: PathLike, task: Optional[int] = None, device: Union[str, torch.device] = "cpu",
                    class_names: Optional[Sequence[str]] = None,
                    overrides: Union[str, Sequence[str], None] = None) -> ContinualClassifier:
    """A classifier from a run directory (its last finished task, or `task`, 1-based), one of its
    checkpoints (checkpoints/task_NN.pt) or a file written by ContinualClassifier.export.

    The run's model is rebuilt from its config (model.name / model.pretrained) and checked against
    the checkpoint's reference text embeddings. The pretrained weights must be where the run found
    them, or `overrides` say where they lie now: "model.cache_dir=/new/hf_cache", or, for a run that
    named a weights file, "model.pretrained=/new/path/weights.pt" (CLI: --set). class_names: only for
    checkpoints written before they were stored (the run's class order); by default they come from the
    checkpoint. An export holds its weights and class names: neither applies to it.
    """
    if task is not None and (isinstance(task, bool) or not isinstance(task, int) or task < 1):
        raise ClassifierError(f"task must be a whole number >= 1 (1-based; --task), got {task!r}")
    if isinstance(class_names, str):
        raise ClassifierError(f"class_names must be a list of names, got one string {class_names!r}")
    from .api import override_list
    overrides = override_list(overrides)
    for change in overrides:
        if override_key(change) not in CLASSIFIER_OVERRIDABLE:
            hint = {"run.device": "; the device is device= (predict --device)",
                    "eval.batch_size": "; the batch is predict's batch_size= (--batch-size)"}.get(override_key(change), "")
            raise ClassifierError(f"load_classifier (--set) cannot override '{change}': it may set only where the run's "
                                  f"pretrained weights now lie ({', '.join(CLASSIFIER_OVERRIDABLE)}){hint}")
    device = _available_device(device)  # before any file is read or weights load
    source = Path(source)
    if source.is_dir():
        path = _run_checkpoint(source, task)
    elif source.is_file() and source.name == "last" and source.parent.name == "checkpoints":  # the pointer file
        path = _run_checkpoint(source.parent.parent, task)  # what it names, as for the run directory
    elif source.is_file():
        if task is not None:
            raise ClassifierError(f"task={task} (--task {task}) selects a checkpoint of a run directory; {source} "
                                  f"is one file")
        path = source
    else:
        raise FileNotFoundError(f"{source} does not exist: give a run directory (train's output_dir), "
                                f"a checkpoint file or an exported classifier")
    state = _read(path)
    kind = state.get("format")
    if isinstance(kind, str) and kind.startswith(EXPORT_FORMAT.rsplit("/", 1)[0] + "/") and kind != EXPORT_FORMAT:
        raise ClassifierError(f"{path} is an export in the format {kind!r} (written by segpcl_fast "
                              f"{state.get('segpcl_fast_version', '?')}); this segpcl_fast ({__version__}) reads "
                              f"{EXPORT_FORMAT!r}: load it with the version that wrote it (or upgrade segpcl_fast)")
    if kind == EXPORT_FORMAT:
        if class_names is not None or overrides:
            given = "class_names" if class_names is not None else f"overrides {overrides}"
            raise ClassifierError(f"{path} is an export: it holds its weights and class names, so {given} "
                                  f"do not apply; load it without them")
        return _from_export(path, state, device)
    return _from_checkpoint(path, state, device, class_names, overrides)


def _available_device(device: Union[str, torch.device]) -> torch.device:
    """`device` as a torch.device that exists here, else one ClassifierError naming the fix."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ClassifierError(f"unknown device {device!r} ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "meta":
        raise ClassifierError(f"device {device!r} holds no values to classify with; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ClassifierError(f"device {device!r}, but no CUDA device is available here; use device='cpu' "
                                  f"(--device cpu)")
        if dev.index is not None and dev.index >= count:
            raise ClassifierError(f"device {device!r}, but there are {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif dev.type != "cpu":  # mps, xpu, ...: asked of torch itself (an unavailable one failed later, as moved weights)
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ClassifierError(f"device {device!r} is not available here ({first}); use device='cpu' "
                                  f"(--device cpu)") from None
    return dev


def _run_checkpoint(run_dir: Path, task: Optional[int]) -> Path:
    from .engine import checkpoint as ckpt
    if not (run_dir / "config.yaml").is_file() and not (run_dir / ckpt.CHECKPOINT_DIR).is_dir():
        runs = runs_below(run_dir)
        raise ClassifierError(f"{run_dir} is not a run directory (no config.yaml, no {ckpt.CHECKPOINT_DIR}/): give "
                              f"train's output_dir, a checkpoint file or an exported classifier"
                              + (f"; runs below it: {join_some(runs)}" if runs else ""))
    if task is None:
        last = ckpt.find_last_checkpoint(run_dir)
        if last is None:
            raise ClassifierError(no_checkpoint_reason(run_dir))
        return last
    path = ckpt.checkpoint_path(run_dir, task - 1)
    if not path.is_file():
        found = sorted(t + 1 for p in path.parent.glob("task_*.pt") if (t := ckpt.task_of_file(p)) is not None)
        raise ClassifierError(f"{run_dir} has no checkpoint of task {task}; tasks with one: {found or 'none'}")
    return path


def no_checkpoint_reason(run_dir: Path) -> str:
    """Why a run folder has no checkpoint to load: trained with run.checkpoint=false (its config.yaml says so;
    its weights were never saved), or it finished no task."""
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        unsaved = saved.get("run", {}).get("checkpoint") is False
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        unsaved = False
    if unsaved:
        return (f"{run_dir} was trained with run.checkpoint=false, so its weights were not saved: its results.json "
                f"holds its numbers, but nothing can load it; train it again with run.checkpoint=true (the default)")
    if (run_dir / "results.json").is_file():  # a finished run copied without its *.pt files
        return (f"no checkpoint in {run_dir}, but its results.json records a run that finished: its checkpoints "
                f"(checkpoints/task_NN.pt) are missing (a copy without its .pt files?); its results.json holds its "
                f"numbers, and loading its weights needs the run's checkpoints/ folder back beside its config.yaml")
    return f"no checkpoint in {run_dir}: the run finished no task"


def _read(path: Path) -> dict:
    from .data.files import is_image_name
    if is_image_name(path):
        raise ClassifierError(f"{path} is an image: give the run first (its directory, a checkpoint or an export), "
                              f"then the images")
    try:
        state = load_torch_file(path)
    except UnsafeFileError as e:
        raise ClassifierError(f"{e}: it is not a segpcl_fast checkpoint or export") from None
    except Exception as e:  # truncated, or not a torch file
        m = re.fullmatch(r"task_(\d+)\.pt", path.name)
        if m and path.parent.name == "checkpoints":  # a run's own checkpoint, damaged (a cut copy, a full disk)
            earlier = int(m.group(1))  # task_NN.pt holds task NN + 1 (1-based): the one before is task NN
            raise ClassifierError(f"checkpoint {path} is damaged ({type(e).__name__}: {e}): copy it again from "
                                  f"the run" + (f", or use the one before it (--task {earlier}, task={earlier})"
                                               if earlier >= 1 else "")) from e
        cut_short = _is_cut_zip(path)  # a torch file (a zip) without its end
        if isinstance(e, DamagedFileError) or cut_short:  # a damaged export (a checkpoint outside checkpoints/)
            raise ClassifierError(f"{path} is damaged ({str(e).split('. ')[0][:200]}): copy it again, or export "
                                  f"it again from its run (segpcl-fast export RUN_DIR -o {path.name})") from None
        raise ClassifierError(f"{path} cannot be read ({type(e).__name__}: {e}): it is not a segpcl_fast "
                              f"checkpoint or export") from e
    if not isinstance(state, dict) or not ({"format", "lora"} & set(state)):
        raise ClassifierError(f"{path} is neither a segpcl_fast checkpoint (checkpoints/task_NN.pt) nor an "
                              f"exported classifier")
    return state


def _is_cut_zip(path: Path) -> bool:
    """The file starts as a zip archive does (what torch.save writes) but lacks a zip's end record: a torch file
    that lost its end (torch.load's error for it depends on the file's size: "central directory" for large
    ones, an OSError for ones under ~64 KB)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04" and not zipfile.is_zipfile(f)
    except OSError:
        return False


def _from_checkpoint(path: Path, state: dict, device, class_names: Optional[Sequence[str]],
                     overrides: Sequence[str] = ()) -> ContinualClassifier:
    from .data import format_prompts
    from .engine import checkpoint as ckpt
    if "config" not in state or "learner" not in state or "task" not in state:
        raise ClassifierError(f"checkpoint {path} stores no config, learner state or task; it was not written by "
                              f"segpcl_fast's trainer")
    try:
        ckpt.check_task_file(path, state)
        ckpt.check_run_config(path, state, "load_classifier (predict, export)")
    except ckpt.CheckpointError as e:
        raise ClassifierError(str(e)) from None
    try:
        cfg = config_from_dict(state["config"])
    except ConfigError as e:  # most often a checkpoint of a newer segpcl_fast, whose config has keys this one lacks
        written = state.get("segpcl_fast_version", "an unrecorded version")
        raise ClassifierError(f"checkpoint {path} was written by segpcl_fast {written} and its config does not "
                              f"load in this one ({__version__}): {e}; load it with the version that wrote it "
                              f"(or upgrade segpcl_fast)") from None
    from .model.clip import ModelLoadError, names_a_file
    if any(override_key(change) == "model.pretrained" for change in overrides):
        if not names_a_file(cfg.model.pretrained):
            raise ClassifierError(f"checkpoint {path}: the run's model.pretrained is {cfg.model.pretrained!r}, not a "
                                  f"file: only a weights file that moved can be named anew (a tag's cache: "
                                  f"model.cache_dir=...)")
    if overrides:
        cfg = apply_overrides(cfg, list(overrides))
    learner = state["learner"]
    n_seen = int(learner["n_seen"])
    names = list(class_names) if class_names is not None else state.get("class_names")
    if names is None:  # a checkpoint from before they were stored: a finished run's results.json has them
        names = _names_from_results(path.parent.parent / "results.json")
    if names is None:
        raise ClassifierError(f"checkpoint {path} predates stored class names and its run has no results.json "
                              f"holding them: pass class_names= (the run's class order, e.g. "
                              f"Trainer(cfg).scenario.class_names)")
    if len(names) < n_seen:
        raise ClassifierError(f"{len(names)} class names for a checkpoint that has seen {n_seen} classes")
    names = list(names)[:n_seen]
    from .engine.trainer import build_model
    try:
        # build_model seeds torch's CPU generator: the caller's random streams are given back
        from .api import random_streams_kept
        with random_streams_kept():
            model, _ = build_model(cfg, torch.device(device))
    except ModelLoadError as e:
        key = "model.pretrained=/new/path" if names_a_file(cfg.model.pretrained) else "model.cache_dir=/new/cache"
        raise ClassifierError(f"checkpoint {path}: the run's pretrained weights do not load here ({e}); if they "
                              f"moved, say where: --set {key} (load_classifier(..., overrides=['{key}']))") from None
    from .model.clip import config_quick_gelu
    try:
        ckpt.check_activation(path, state, model.quick_gelu, config_quick_gelu(cfg.model.name))
    except ckpt.CheckpointError as e:
        raise ClassifierError(str(e)) from None
    # B = 0 here: the pretrained model, whose text embeddings the run stored as its reference
    with torch.no_grad():
        ref = model.class_embeddings(format_prompts(names, cfg.data.templates), device=device)
    stored_ref = learner["ref_text"][:n_seen].to(device)
    if not same_reference(stored_ref, ref, cfg.run.text_precision):
        raise ClassifierError(f"checkpoint {path}: the pretrained text embeddings of these class names differ "
                              f"from the run's (other weights at model.pretrained={cfg.model.pretrained!r}, or "
                              f"class names not in the run's order)")
    stored_image = learner.get("ref_image")  # checkpoints since 2026-12-06
    probes = reference_image_embeddings(model, device) if stored_image is not None else None
    if probes is not None and not same_reference(stored_image.to(device), probes, cfg.run.precision):
        raise ClassifierError(f"checkpoint {path}: the pretrained image embeddings of the probe images differ from "
                              f"the run's: another image tower at model.pretrained={cfg.model.pretrained!r}; give "
                              f"the run's own weights (--set model.pretrained=/path/to/them)")
    try:
        load_lora_state_dict(model, state["lora"])
    except ValueError as e:
        raise ClassifierError(f"checkpoint {path}: {e}") from None
    # the run's test transform (what its prototypes were made with), whatever the model now asks for
    model.image_stats = dataclasses.replace(model.image_stats, **ckpt.stored_image_geometry(state))
    protos = learner["prototypes"]
    return ContinualClassifier(model=model.eval(), class_names=names,
                               text=learner["text_cache"].to(device), prototypes=_prototype_tensor(protos, device),
                               beta=cfg.prototypes.beta, task=int(state["task"]) + 1)


def _names_from_results(path: Path) -> Optional[list]:
    import json
    try:
        return json.loads(path.read_text()).get("class_names")
    except (OSError, ValueError):
        return None


def _prototype_tensor(protos, device) -> torch.Tensor:
    from .method.prototypes import PrototypeMemory
    memory = PrototypeMemory()
    memory.load_state_dict(protos)
    return memory.tensor.to(device)


def _config_alias(config: dict) -> str:
    """A name open_clip knows `config` (an export's model config) by: registered once per process from a
    temporary folder (open_clip reads the file when it is added)."""
    import hashlib
    import json
    import tempfile

    import open_clip
    text = json.dumps(config, sort_keys=True)
    alias = "segpcl-export-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    if open_clip.get_model_config(alias) is None:
        with tempfile.TemporaryDirectory(prefix="segpcl_export_config_") as folder:
            Path(folder, f"{alias}.json").write_text(text)
            open_clip.add_model_config(folder)
    return alias


def _export_model(state: dict, device) -> CLIPModel:
    """The export's model by its name; where that name no longer resolves (a `local-dir:` folder that
    moved, a config registered only in the exporting process), by the model config the export carries,
    so an export stands on its own."""
    from .model.clip import ModelLoadError
    name, weights, pretrained = state["model_name"], state["state_dict"], state.get("pretrained")
    quick_gelu = bool(state.get("quick_gelu", False))  # exports before it was stored: the name's config decided
    try:
        return model_from_state_dict(name, weights, device=device, pretrained=pretrained, quick_gelu=quick_gelu)
    except ModelLoadError as error:
        if not state.get("model_config"):
            raise
        try:
            model = model_from_state_dict(_config_alias(state["model_config"]), weights, device=device,
                                          pretrained=pretrained, quick_gelu=quick_gelu)
        except ModelLoadError:
            raise error from None
        log.info("export's model '%s' does not resolve here (%s): built from the config it carries", name, error)
        model.name, model.carried_config = name, copy.deepcopy(state["model_config"])  # a re-export keeps both
        return model


def _from_export(path: Path, state: dict, device) -> ContinualClassifier:
    from .api import random_streams_kept
    try:
        with random_streams_kept():  # open_clip builds the model at random before the weights replace it
            model = _export_model(state, device)
        stats = state["image_stats"]
        model.image_stats = ImageStats(size=int(stats["size"]), mean=tuple(stats["mean"]), std=tuple(stats["std"]),
                                       **{k: stats[k] for k in ("resize_mode", "interpolation", "fill_color") if k in stats})
        model.image_autocast = getattr(torch, state["image_autocast"]) if state.get("image_autocast") else None
        return ContinualClassifier(model=model.eval(), class_names=list(state["class_names"]),
                                   text=state["text"].to(device), prototypes=state["prototypes"].to(device),
                                   beta=float(state["beta"]), task=int(state["task"]))
    except KeyError as e:
        raise ClassifierError(f"export {path} lacks {e}: it was not written by ContinualClassifier.export") from e
