"""Checkpoints: atomic torch.save, a config fingerprint so a resumed run is the same run, and a
'last' pointer so resuming finds the last finished task.

    fp = config_fingerprint(cfg.to_dict(), RUN_ONLY_KEYS)
    save_task_checkpoint(out, t, {"task": t, "fingerprint": fp, "config": cfg.to_dict(), ...})
    last = find_last_checkpoint(out)                # out/checkpoints/task_03.pt, or None
    state = load_checkpoint(last, fp, cfg.to_dict(), RUN_ONLY_KEYS)   # CheckpointError on mismatch

Layout: <output_dir>/checkpoints/task_{t:02d}.pt (t = 0-based index of the finished task, as the
trainer counts) and <output_dir>/checkpoints/last, a one-line text file naming the newest one.
Both are replaced atomically (temp file in the same folder, fsync, os.replace), so a crash
mid-write leaves the previous checkpoint and pointer intact.

A checkpoint holds tensors and plain values only (dicts, lists, numbers, strings) and is loaded with
torch.load(weights_only=True) (fileio.load_torch_file): a crafted file cannot run code.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import torch

from ..fileio import UnsafeFileError, atomic_write_text, load_torch_file, remove_stale_temps, save_torch_file
from ..version import __version__

PathLike = Union[str, os.PathLike]

# Keys that may differ between a run and its resumption (they change no setting of the method):
# where files go and what is shown, how fast it runs, data.expected_classes (a check on the data,
# not a setting), and where the data and weights lie (a moved copy of the same dataset: the trainer
# then checks the class names against the checkpoint's, see check_class_names). Some change results
# without changing the method: data.num_workers, as each DataLoader worker draws the random
# augmentations of its batches from its own RNG (seeded from the loader's generator and its worker
# id; with 0 workers they come from the main process's); and, at rounding level, the keys that pick
# how the arithmetic runs (run.device, run.ops, run.compile, run.tf32, run.num_threads, dpgd.batch_size, and
# eval.batch_size, which also batches the new classes' prototype features). A run
# resumed with other values is a valid run whose later tasks are not bit-identical to the uninterrupted one.
RUN_ONLY_KEYS = ("run.resume", "run.overwrite", "run.output_dir", "run.progress", "run.plots", "run.tensorboard",
                 "run.checkpoint", "run.num_threads", "run.compile", "run.tf32", "run.device", "run.ops", "eval.batch_size", "data.num_workers",
                 "dpgd.batch_size", "data.expected_classes", "data.root", "data.frames_dir", "model.cache_dir",
                 *("data.names_file", "data.class_list", "data.split_file", "model.pretrained"))
# ^ where the dataset's side files and the weights lie (a moved file, a path written relative to where
# the run started): what they hold is checked instead, as for data.root: the class names and the
# train / test split (check_class_names, check_split) and the pretrained model's text embeddings
# (Learner.load_state_dict's reference embeddings: other weights differ by far more than rounding)

# the run-only keys above that change a resumed run's later tasks (augmentations; rounding): a resume warns of them
RESULT_CHANGING_KEYS = ("data.num_workers", "run.device", "run.ops", "run.compile", "run.tf32", "run.num_threads",
                        "eval.batch_size", "dpgd.batch_size")

# run-only keys a user changes on purpose, named in error messages (RUN_ONLY_KEYS has the whole list)
RUN_ONLY_EXAMPLES = ("run.device", "run.ops", "eval.batch_size", "data.root", "model.cache_dir")

CHECKPOINT_DIR = "checkpoints"

# the analysis (ablate, sweep, retention, distill-sources) whose runs are resumed, for a refused resume's advice:
# such a run's config.yaml is the analysis' config resolved for one variant / point / seed in its own folder, so
# `--config <run>/config.yaml` is not the fix (ablate with lora_finetune's stored prototypes.beta = 0 refuses segpcl)
_RESUMING_ANALYSIS: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("segpcl_resuming_analysis",
                                                                                   default=None)


@contextlib.contextmanager
def resuming_analysis(name: str):
    """Inside the block, a refused resume names the analysis `name` (its command again with --resume)."""
    token = _RESUMING_ANALYSIS.set(name)
    try:
        yield
    finally:
        _RESUMING_ANALYSIS.reset(token)


def resuming_analysis_name() -> Optional[str]:
    return _RESUMING_ANALYSIS.get()

LAST_POINTER = "last"
_TASK_FILE = re.compile(r"^task_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run; the message says why and how to fix it."""


# ----------------------------------------------------------------------------- fingerprint

def flatten_config(config: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"run": {"seed": 0}} -> {"run.seed": 0} (nested mappings only; lists stay values)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    flat: dict[str, Any] = {}
    for key, val in config.items():
        name = f"{prefix}{key}"
        if isinstance(val, Mapping):
            flat.update(flatten_config(val, f"{name}."))
        else:
            flat[name] = val
    return flat


def _relevant(config: Mapping, ignore_keys: Iterable[str]) -> dict[str, Any]:
    ignore = set(ignore_keys)
    return {k: v for k, v in flatten_config(config).items() if k not in ignore}


def config_fingerprint(config: Mapping, ignore_keys: Iterable[str] = RUN_ONLY_KEYS) -> str:
    """sha256 (hex, 16 chars) of the config without `ignore_keys` (dotted, e.g. "run.resume")."""
    canon = json.dumps(_relevant(config, ignore_keys), sort_keys=True, default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def config_diff(old: Mapping, new: Mapping, ignore_keys: Iterable[str] = RUN_ONLY_KEYS,
                defaults: Optional[Mapping] = None) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old value, new value)} for every result-relevant key that differs.

    With `defaults`, a key that `old` lacks (added by a later version) does not differ while
    `new` holds its default value."""
    a, b = _relevant(old, ignore_keys), _relevant(new, ignore_keys)
    default = _relevant(defaults, ignore_keys) if defaults is not None else {}
    missing = object()
    diff = {}
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va is missing and key in default and default[key] == vb:
            continue
        if va != vb:
            diff[key] = (None if va is missing else va, None if vb is missing else vb)
    return diff


# ----------------------------------------------------------------------------- save / load

def save_checkpoint(path: PathLike, state: Mapping) -> Path:
    """torch.save `state` to `path` atomically: a reader sees the old file or the whole new one."""
    return save_torch_file(dict(state), path, durable=True)


def load_checkpoint(path: PathLike, expected_fingerprint: Optional[str] = None,
                    expected_config: Optional[Mapping] = None,
                    ignore_keys: Iterable[str] = RUN_ONLY_KEYS, map_location: Any = "cpu",
                    defaults: Optional[Mapping] = None, purpose: str = "resume") -> dict:
    """Load a checkpoint; with `expected_fingerprint`, raise CheckpointError when it was made
    with another config. The checkpoint's own "config" (if stored) and `expected_config` are
    diffed so the message names the differing keys. With `defaults` (the config's default
    values), a key that the stored config lacks (added by a later version) matches when its
    current value is the default, so upgrading the package does not strand a run.
    `purpose` ("resume" or "evaluate") picks the advice the error gives."""
    path = Path(path)
    if not path.is_file():
        fix = ("start without --resume, or point run.output_dir at the folder of the run to resume"
               if purpose == "resume" else "give the run directory the checkpoint belongs to")
        raise CheckpointError(f"checkpoint {path} does not exist; {fix}")
    try:
        state = load_torch_file(path, map_location=map_location)
    except UnsafeFileError as e:
        raise CheckpointError(f"{e}: it is not a checkpoint segpcl_fast wrote") from None
    except Exception as e:  # truncated / not a torch file
        pointer = path.parent / LAST_POINTER
        also = f" and {pointer} (it names this file)" if _names(pointer, path) else ""
        fix = (f"delete it{also} to resume from the one before, or start a new run.output_dir" if purpose == "resume"
               else f"copy it again from the run, or delete it{also} to {purpose} the task before")
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); {fix}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    if str(state.get("format", "")).startswith("segpcl_fast.classifier/"):
        raise CheckpointError(f"{path} is an exported classifier (segpcl-fast export), not a training checkpoint: "
                              f"{purpose} needs the run's own checkpoints/task_NN.pt; use the export with "
                              f"`segpcl-fast predict` or segpcl_fast.load_classifier")
    check_task_file(path, state)
    if expected_fingerprint is not None:
        _check_fingerprint(path, state, expected_fingerprint, expected_config, tuple(ignore_keys), defaults,
                           purpose)
    return state


def _pointer_name(pointer: Path) -> Optional[str]:
    """The file name the 'last' pointer file `pointer` holds: None without a pointer file, '' when it cannot be
    read as text (a damaged pointer names no checkpoint)."""
    if not pointer.is_file():
        return None
    try:
        return pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _names(pointer: Path, path: Path) -> bool:
    """Whether the 'last' pointer file `pointer` names the checkpoint `path` (beside it)."""
    return _pointer_name(pointer) == path.name


def task_of_file(path: PathLike) -> Optional[int]:
    """NN (0-based) of a file named task_NN.pt, else None."""
    m = _TASK_FILE.match(Path(path).name)
    return int(m.group(1)) if m else None


def check_task_file(path: PathLike, state: Mapping) -> None:
    """A file named task_NN.pt must hold task NN (0-based, as saved): a copy of another run's or another
    task's checkpoint under that name would otherwise be taken for it."""
    named = task_of_file(path)
    if named is not None and isinstance(state.get("task"), int) and state["task"] != named:
        raise CheckpointError(f"{path} holds task {state['task'] + 1} (1-based), not task {named + 1} as "
                              f"its name says: a checkpoint copied or renamed by hand; put the run's own file back")


def check_run_config(path: PathLike, state: Mapping, purpose: str) -> None:
    """A checkpoint in <run>/checkpoints/ must come from the config in <run>/config.yaml (when it is
    there and readable): the same check as resume and evaluate make, for readers of a run directory."""
    path = Path(path)
    own = path.parent.parent / "config.yaml"
    if path.parent.name != CHECKPOINT_DIR or not own.is_file() or "config" not in state:
        return
    from ..config import ConfigError, load_config
    try:
        cfg = load_config(own)
    except (ConfigError, OSError, ValueError):
        return  # the checkpoint carries its own config; a config.yaml edited since cannot vouch for it
    _check_fingerprint(path, state, config_fingerprint(cfg.to_dict()), cfg.to_dict(), RUN_ONLY_KEYS,
                       type(cfg)().to_dict(), purpose)


def format_config_diff(diff: Mapping[str, tuple[Any, Any]], limit: Optional[int] = None) -> str:
    """config_diff's result as an error message lists it: "key was old, now new; ..." (the first `limit`)."""
    return "; ".join(f"{k} was {old!r}, now {new!r}" for k, (old, new) in list(diff.items())[:limit])


def _check_fingerprint(path: Path, state: dict, expected: str, expected_config: Optional[Mapping],
                       ignore_keys: Iterable[str], defaults: Optional[Mapping] = None,
                       purpose: str = "resume") -> None:
    found = state.get("fingerprint", state.get("config_fingerprint"))
    if found == expected:
        return
    diff = None
    if expected_config is not None and isinstance(state.get("config"), Mapping):
        diff = config_diff(state["config"], expected_config, ignore_keys, defaults)
        if not diff and defaults is not None:  # only keys added since, each at its default
            return
    own = Path(path).parent.parent / "config.yaml"  # <run>/checkpoints/task_NN.pt -> <run>/config.yaml
    known = _relevant(defaults, ignore_keys) if defaults is not None else None
    unknown = sorted(k for k in diff or {} if known is not None and k not in known)
    if unknown:  # a newer version's keys: "resume with the same config" cannot be followed here
        writer = state.get("segpcl_fast_version")
        install = f" (pip install segpcl_fast=={writer})" if writer else ""
        raise CheckpointError(f"checkpoint {path} was written by {f'segpcl_fast {writer}' if writer else 'another version'} "
                              f"with config keys this segpcl_fast ({__version__}) does not know: {', '.join(unknown)}; "
                              f"{purpose} it with the version that wrote it{install}, or start a new run in "
                              "another folder (-o DIR)")
    if purpose == "resume":
        fix = ("Resume (--resume) with the same config (only run-only keys such as "
               f"{', '.join(RUN_ONLY_EXAMPLES)}, ... may change), or start a fresh run in another folder "
               "(-o DIR, or run.output_dir).")
        analysis = _RESUMING_ANALYSIS.get()
        if analysis:  # one run of an analysis: its config.yaml is not the analysis' config
            fix = (f"Resume the {analysis} with the options it was started with (the same command and --resume; "
                   f"only run-only keys such as {', '.join(RUN_ONLY_EXAMPLES)}, ... may change), or start it afresh "
                   f"in another folder (-o DIR).")
        elif own.is_file():
            fix += f" The run's own config: --config {own}"
    else:
        fix = (f"The run directory's config.yaml and its checkpoints come from different runs (a copied or "
               f"mixed-up folder?): {purpose} needs a run directory whose checkpoints its own config wrote "
               f"(only how it runs and where files lie may differ: {', '.join(RUN_ONLY_EXAMPLES)}, ...).")
    if found is None:
        raise CheckpointError(f"checkpoint {path} stores no config fingerprint, so it cannot be "
                              f"matched to this config. {fix}")
    what = "a different config"
    if diff:
        what = "a different config: " + format_config_diff(diff)
    raise CheckpointError(f"checkpoint {path} was made with {what} (fingerprint {found} != "
                          f"{expected}). {fix}")


# ----------------------------------------------------------------------------- per-task files

def check_class_names(path: PathLike, state: Mapping, class_names: list) -> None:
    """The checkpoint's ordered class names (stored since they are) must be this run's: a data root
    may move, but it must hold the same classes in the same order."""
    stored = state.get("class_names")
    if stored is None or list(stored) == list(class_names):
        return
    first = next((i for i, (a, b) in enumerate(zip(stored, class_names)) if a != b), min(len(stored), len(class_names)))
    raise CheckpointError(f"checkpoint {path} was trained on other classes than data.root now holds: class "
                          f"{first} was {stored[first] if first < len(stored) else '(none)'!r}, now "
                          f"{class_names[first] if first < len(class_names) else '(none)'!r} ({len(stored)} "
                          f"classes then, {len(class_names)} now); point data.root at the run's dataset"
                          + ("; if only the names differ (ImageNet-R's README.txt names, which runs before 2026-12-07 "
                             "took, are CLIP's now), give the run's own: --set data.names_file=FILE (README.txt for "
                             "those)" if len(stored) == len(class_names) else ""))


def check_split(path: PathLike, state: Mapping, digest: str, legacy_digest: Optional[str] = None) -> None:
    """The checkpoint's train / test split (data.base.split_digest, stored since it is) must be the one
    data.root gives now: a copy that splits the same files otherwise would test on other images. A checkpoint
    written before UCF101's videos were keyed by name holds `legacy_digest` (split_digest(legacy=True))."""
    stored = state.get("split_digest")
    if stored is None or stored == digest or (legacy_digest is not None and stored == legacy_digest):
        return
    raise CheckpointError(f"checkpoint {path} was trained on another train / test split than data.root gives now "
                          f"(split digest {stored}, now {digest}): point data.root at the run's copy of the dataset, "
                          f"with the split it had (its train / test folders or split files: train.txt / test.txt, "
                          f"data.split_file), or the same data.split_file")


def restore_learner(path: PathLike, learner, state: Mapping, pretrained: Optional[str]) -> None:
    """learner.load_state_dict(state["learner"]); a checkpoint whose reference text or image embeddings are
    not this model's (the run's weights moved, or others given) is one CheckpointError naming model.pretrained."""
    from ..method.learner import ReferenceMismatch
    try:
        learner.load_state_dict(state["learner"])
    except ReferenceMismatch as e:
        what = "pretrained weights (model.pretrained={!r}) or prompts" if e.tower == "text" else \
            "pretrained image tower (model.pretrained={!r})"
        raise CheckpointError(f"checkpoint {path}: the run's reference {e.tower} embeddings differ from this model's, "
                              f"so these are not the run's {what.format(pretrained)}; give the run's own: "
                              "--set model.pretrained=/path/to/them (a file) or "
                              "--set model.cache_dir=/their/cache (a named tag)") from None


def check_same_data(path: PathLike, state: Mapping, class_names: list, split_digest: str,
                    geometry: Mapping, legacy_split_digest: Optional[str] = None) -> None:
    """What resume and evaluate ask of a checkpoint before using it: this run's class names, train / test
    split and test-transform geometry are the checkpoint's (check_class_names, check_split,
    check_image_geometry)."""
    check_class_names(path, state, class_names)
    check_split(path, state, split_digest, legacy_split_digest)
    check_image_geometry(path, state, geometry)


# the test transform's geometry of checkpoints written before it was stored: every model's then
LEGACY_IMAGE_GEOMETRY = {"resize_mode": "shortest", "interpolation": "bicubic", "fill_color": 0}


def stored_image_geometry(state: Mapping) -> dict:
    """The evaluation geometry (model.clip.ImageStats.geometry) the checkpoint's run used."""
    return dict(state.get("image_geometry") or LEGACY_IMAGE_GEOMETRY)


def check_image_geometry(path: PathLike, state: Mapping, geometry: Mapping) -> None:
    """The run's prototypes and accuracies were made with its test transform: one of another
    geometry (open_clip's preprocess_cfg for the model, followed since 2026-12-04) would mix two."""
    stored = stored_image_geometry(state)
    if stored == dict(geometry):
        return
    older = "" if state.get("image_geometry") else (" (checkpoints written before the geometry was stored "
                                                    "used it for every model)")
    raise CheckpointError(f"checkpoint {path} was made with test images resized {stored}{older}, but this model's "
                          f"open_clip preprocess asks for {dict(geometry)}: its prototypes and accuracies would mix "
                          f"the two; finish or evaluate it with the segpcl_fast that wrote it, or start a new run (-o)")


def check_activation(path: PathLike, state: Mapping, built: bool, name_default: bool) -> None:
    """The run's model and this one both run QuickGELU, or both GELU (CLIPModel.quick_gelu: `built`). Checkpoints
    store it since 2026-12-07; before, open_clip's config for the model name decided (`name_default`), also for
    OpenAI's weights under a GELU name, which model.clip.weights_quick_gelu now builds with QuickGELU."""
    stored = state.get("quick_gelu")
    ran = name_default if stored is None else bool(stored)
    if ran == built:
        return
    act = {True: "QuickGELU", False: "GELU"}
    older = "" if stored is not None else (" (checkpoints written before the activation was stored ran the one "
                                           "open_clip's config for the model name sets)")
    moved = (" If model.pretrained now names a state-dict copy of the run's weights (a local file says nothing of "
             "its activation), name the tag (its cache: model.cache_dir) or OpenAI's TorchScript file instead."
             if ran and not built else "")
    raise CheckpointError(f"checkpoint {path} was made by a model with {act[ran]} in its MLPs{older}, but this model "
                          f"runs {act[built]} (the activation these weights were trained with): its LoRA, anchors and "
                          f"prototypes belong to the other model; finish or evaluate it with the segpcl_fast that "
                          f"wrote it, or start a new run (-o).{moved}")


def restore_lora(path: PathLike, model: torch.nn.Module, state: Mapping) -> None:
    """The checkpoint's LoRA tensors into the model, every one of them (model.lora.load_lora_state_dict)."""
    from ..model.lora import load_lora_state_dict
    try:
        load_lora_state_dict(model, state["lora"])
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None


def checkpoint_path(output_dir: PathLike, task: int) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / f"task_{task:02d}.pt"


def save_task_checkpoint(output_dir: PathLike, task: int, state: Mapping) -> Path:
    """Write checkpoints/task_{task:02d}.pt, then point checkpoints/last at it (both atomic)."""
    if task < 0:
        raise ValueError(f"task index must be >= 0, got {task}")
    path = save_checkpoint(checkpoint_path(output_dir, task), state)
    _write_pointer(path.parent / LAST_POINTER, path.name)
    return path


def _write_pointer(pointer: Path, name: str) -> None:
    atomic_write_text(pointer, name + "\n", durable=True)


def remove_stale_run_temps(output_dir: PathLike) -> list[Path]:
    """The temp files a killed run left beside its own files: config.yaml and the report in the run dir,
    task_NN.pt and the pointer in checkpoints/ (fileio.remove_stale_temps)."""
    from ..report.run_report import REPORT_FILES
    own = {"config.yaml", *REPORT_FILES}
    out = Path(output_dir)
    return (remove_stale_temps(out, lambda name: name in own)
            + remove_stale_temps(out / CHECKPOINT_DIR, lambda name: name == LAST_POINTER or bool(_TASK_FILE.match(name))))


RUN_LOCK = ".segpcl-run.lock"


def lock_run_dir(output_dir: PathLike) -> Optional[int]:
    """Take the run lock of an output dir (an exclusive flock on <dir>/.segpcl-run.lock, which holds the
    owner's pid) for as long as a run writes there; returns its file descriptor for unlock_run_dir.
    Another process holding it (the same run started twice; workers orphaned by a SIGKILLed torchrun,
    still training) makes this a ConfigError naming its pid. The OS drops the lock when its process
    dies, so a killed run leaves none behind. None where fcntl is missing (Windows): no lock."""
    try:
        import fcntl
    except ImportError:
        return None
    from ..config import ConfigError
    path = Path(output_dir) / RUN_LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held: its pid, as far as it wrote one
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"output dir {output_dir} is in use by another run (pid {holder}; its lock is "
                              f"{path}): let it finish or stop it, or pick another folder with -o") from None
        except OSError as exc:  # a filesystem without flock (some network mounts): run without the lock
            os.close(fd)
            path.unlink(missing_ok=True)
            logging.getLogger("segpcl_fast.engine").warning(
                "no run lock in %s (%s): nothing stops a second run from writing there", output_dir, exc)
            return None
        try:  # unlock_run_dir unlinks before it unlocks: a lock on a file no longer at `path` locks nothing
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def unlock_run_dir(output_dir: PathLike, fd: int) -> None:
    """Release lock_run_dir's lock and remove its file (first the file, then the lock: see there)."""
    Path(output_dir, RUN_LOCK).unlink(missing_ok=True)
    os.close(fd)


def find_last_checkpoint(output_dir: PathLike) -> Optional[Path]:
    """The newest finished-task checkpoint of a run, or None when there is none.

    Follows checkpoints/last; without a pointer (e.g. a crash between the two writes, or files
    copied by hand) falls back to the highest task_NN.pt.
    """
    folder = Path(output_dir) / CHECKPOINT_DIR
    pointer = folder / LAST_POINTER
    name = _pointer_name(pointer)
    if name is not None:
        target = folder / name
        if not _TASK_FILE.match(name) or not target.is_file():
            what = f"names '{name}', which is not a checkpoint in {folder}" if name else "names no checkpoint file"
            raise CheckpointError(f"{pointer} {what}; delete {pointer} to resume from the highest task_NN.pt there")
        return target
    if not folder.is_dir():
        return None
    found = [(t, p) for p in folder.iterdir() if (t := task_of_file(p)) is not None]
    return max(found)[1] if found else None
