"""CLIP through open_clip: loading (name + tag, or a local file), r(x), v(x), text embeddings.

Notation of method.md:
  r(x)  raw visual feature: the image tower's pooled output before the final projection
        (ViT: ln_post(CLS); a timm tower: its trunk's pooled feature
        before the trunk's classifier head, e.g. SigLIP's MAP pool)     -> CLIPModel.raw_features
  v(x)  = proj(r(x)), the CLIP image embedding                 -> CLIPModel.project
  u_c   L2-normalised text embedding of class c's prompt(s)    -> CLIPModel.class_embeddings
  s     = exp(logit_scale)                                     -> CLIPModel.logit_scale()

Precision: `CLIPModel.image_autocast` (None, or torch.bfloat16 / torch.float16 for run.precision=bf16 /
fp16: AUTOCAST_DTYPES) runs the image
tower's transformer under autocast; r(x) is returned in fp32, so the projection and everything the
method computes from the features (logits, cosines, KL, prototypes, seed scores) stays fp32 (a bf16
logit at s = 100 (about 20-35) is spaced 0.125-0.25 apart: argmax ties, L_GR / L_ACGD > 0 at student = teacher).
The text tower runs in fp32 (it sees class prompts, not the batch) unless `CLIPModel.text_autocast`
is set (run.text_precision=bf16 or fp16, opt-in): then its transformer runs under autocast and its
embeddings come out fp32 in the same way.

Knows nothing of method/ or engine/.
"""
from __future__ import annotations

import contextlib
import difflib
from collections import OrderedDict
import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import PRECISIONS
from ..fileio import DamagedFileError, UnsafeFileError, check_torch_zip, load_torch_file
from . import frozen_cast, vit_tail
from .patch_embed import conv_is_cheaper, use_patch_gemm

log = logging.getLogger("segpcl_fast.model")

PACKAGE_DIR = Path(__file__).resolve().parent.parent
MODEL_CONFIG_DIR = PACKAGE_DIR / "model_configs"
ASSET_DIR = PACKAGE_DIR / "assets"
# (model name, tag) -> checkpoint shipped inside the package
# run.precision / text_precision -> the tower's autocast dtype (None: no autocast, fp32)
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NATIVE_BF16_MAJOR = 8  # compute capability from which a GPU has bf16 tensor cores (Ampere); before: fp16 only


def native_bf16(device) -> bool:
    """Whether the CUDA `device` computes bf16 natively (else torch emulates it, slowly: run.precision=fp16)."""
    return torch.cuda.get_device_capability(torch.device(device))[0] >= NATIVE_BF16_MAJOR
BUNDLED_WEIGHTS = {("segpcl-tiny", "segpcl-world"): ASSET_DIR / "segpcl-tiny-world.pt"}

_registered = False
# the keys of open_clip's PreprocessCfg that model.preprocess may set (size is the model's own)
PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode", "fill_color")


class ModelLoadError(RuntimeError):
    """The model or its weights cannot be loaded; the message says why and what to do."""


def open_clip_resolves(name: str, pretrained: Optional[str]) -> bool:
    """Whether open_clip alone (no segpcl_fast import) builds model `name` with weights `pretrained`: not for a
    config only this package ships (segpcl-tiny), weights only it bundles (segpcl-world) or a TorchScript file
    (open_clip's weights-only torch.load refuses one)."""
    if (name, pretrained) in BUNDLED_WEIGHTS or (MODEL_CONFIG_DIR / f"{name}.json").is_file():
        return False
    file = os.path.expanduser(pretrained) if pretrained else ""  # OpenAI's TorchScript file: load_model reads it
    return not (os.path.isfile(file) and _is_torchscript_archive(file))


def register_model_configs() -> None:
    """Make the package's model configs (e.g. segpcl-tiny) known to open_clip (once)."""
    global _registered
    if _registered:
        return
    import open_clip
    open_clip.add_model_config(MODEL_CONFIG_DIR)
    _registered = True


@dataclass
class ImageStats:
    """The image tower's input: size and normalisation, and open_clip's evaluation geometry for it
    (visual.preprocess_cfg: resize_mode, interpolation, fill_color; data.transforms.eval_geometry)."""
    size: int
    mean: tuple
    std: tuple
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    fill_color: int = 0

    def geometry(self) -> dict:
        """The keyword arguments of data.transforms' test transform beyond size, mean and std."""
        return {"resize_mode": self.resize_mode, "interpolation": self.interpolation, "fill_color": self.fill_color}


def _autocast_or_not(device_type: str, dtype: Optional[torch.dtype]):
    """Autocast to `dtype` (a tower's image_autocast / text_autocast), or nothing when it is None."""
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


TOKEN_CACHE_SIZE = 8  # prompt sets CLIPModel.prompt_tokens keeps (a task uses 2-3: all, seen, old classes)


class CLIPModel(nn.Module):
    """A thin wrapper around an open_clip CLIP exposing the quantities the method needs."""

    def __init__(self, clip: nn.Module, tokenizer, name: str, pretrained: Optional[str]):
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.name = name
        self.pretrained = pretrained
        # random weights (pretrained None) drawn right after torch.manual_seed(weights_seed): a run's model
        # (engine.trainer.build_model sets it), so that its base can be drawn again outside segpcl_fast
        self.weights_seed: Optional[int] = None
        self._said_tower_hooks = False  # raw_features' warning about hooks on the tower itself, once
        visual = clip.visual
        size = visual.image_size
        if isinstance(size, (tuple, list)):
            if len(set(size)) != 1:
                raise ModelLoadError(f"{name} takes non-square images {tuple(size)}: not supported (the CLIP "
                                     f"transforms and the method's anchors are square); use a square image_size")
            size = size[0]
        size = int(size)
        preprocess = getattr(visual, "preprocess_cfg", None) or {}
        self.image_stats = ImageStats(size=size,
                                      mean=tuple(getattr(visual, "image_mean", None) or _OPENAI_MEAN),
                                      std=tuple(getattr(visual, "image_std", None) or _OPENAI_STD),
                                      resize_mode=preprocess.get("resize_mode") or "shortest",
                                      interpolation=preprocess.get("interpolation") or "bicubic",
                                      fill_color=int(preprocess.get("fill_color") or 0))
        self.image_autocast: Optional[torch.dtype] = None  # autocast dtype of the image tower (None: off)
        self.text_autocast: Optional[torch.dtype] = None  # of the text transformer (run.text_precision; None: fp32)
        # tower -> dtype its frozen GEMM weights are stored in (model/frozen_cast.py; empty: as loaded)
        self.frozen_storage: dict[str, torch.dtype] = {}
        self._token_cache: OrderedDict = OrderedDict()  # prompt_tokens: tokenized prompt sets
        self._vit = hasattr(visual, "_embeds") and hasattr(visual, "_pool")
        # a ViT's stride = kernel patch conv as one GEMM (model/patch_embed.py); "conv" / "none" otherwise
        self.patch_embed = use_patch_gemm(visual) if self._vit else "none"
        # open_clip's TimmModel: trunk (a timm model, its classifier head the projection when the config
        # names none) then head (open_clip's extra projection, possibly empty)
        self._timm = (not self._vit and hasattr(getattr(visual, "trunk", None), "forward_head")
                      and hasattr(visual.trunk, "get_classifier") and isinstance(getattr(visual, "head", None), nn.Module))
        if not self._vit and type(visual).__name__ == "VisionTransformer":
            import importlib.metadata
            raise ModelLoadError(
                f"open_clip {importlib.metadata.version('open_clip_torch')}'s VisionTransformer has no _embeds / _pool "
                "(added in open_clip 2.32), which r(x), the pre-projection image feature, is read from: "
                "pip install 'open_clip_torch>=2.32'")
        if not (self._vit or self._timm):
            log.warning("image tower of %s is not an open_clip VisionTransformer: r(x) is taken as the "
                        "tower's output (r = v), so the prototype path works in embedding space", name)

    @property
    def quick_gelu(self) -> bool:
        """Whether the model runs QuickGELU (x sigmoid(1.702 x), OpenAI CLIP's activation) in its MLPs: stored
        with a run's checkpoints and exports, which rebuild the model by name (load_model, weights_quick_gelu)."""
        from open_clip.transformer import QuickGELU
        return any(isinstance(m, QuickGELU) for m in self.clip.modules())

    # ------------------------------------------------------------------ image side
    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def text_tower(self) -> nn.Module:
        """The module holding the text transformer blocks (CLIP: the model itself; CustomTextCLIP: .text)."""
        return self.clip.text if hasattr(self.clip, "text") else self.clip

    def raw_features(self, images: torch.Tensor) -> torch.Tensor:
        """r(x): pooled image feature before the final projection (ViT: ln_post(CLS)), in fp32 when the
        tower ran under `image_autocast`."""
        visual = self.visual
        if (self._vit or self._timm) and not self._said_tower_hooks and not torch.compiler.is_compiling() and (
                vit_tail.hooked(visual) or "forward" in vars(visual)):
            self._said_tower_hooks = True
            log.warning("a hook on the image tower (model.visual), or a forward replaced on it, is not run: "
                        "encode_image runs the tower's parts, for the feature before the projection; hook one of its "
                        "modules instead (model.visual.transformer, ln_post, trunk), whose hooks fire and see every "
                        "token")
        with _autocast_or_not(images.device.type, self.image_autocast):
            if self._vit:
                # the last block for the class token alone where that is all _pool reads (model/vit_tail.py)
                pooled, _ = visual._pool(vit_tail.run_transformer(visual, visual._embeds(images)))
            elif self._timm:  # the trunk's pooled (and fc_norm'ed) feature before its classifier head
                pooled = visual.trunk.forward_head(visual.trunk.forward_features(images), pre_logits=True)
            else:
                pooled = visual(images)
        return pooled.float() if self.image_autocast is not None else pooled

    def compiled_choices(self, device: torch.device) -> dict:
        """What raw_features chooses on fp32 images on `device` that a compiled graph cannot record
        (ops.last_choice: the trainer records these for a compiled run's results.json): the patch
        embedding's GEMM or convolution and the last block's class-token tail or whole block."""
        choices = {}
        if self.patch_embed == "gemm":
            conv = conv_is_cheaper(torch.device(device).type == "cuda", torch.float32, self.image_autocast is not None)
            choices["patch_embed"] = "conv" if conv else "gemm"
        if self._vit:
            choices["vit_last_block"] = "cls" if vit_tail.applies(self.visual) else "full"
        return choices

    def project(self, raw: torch.Tensor) -> torch.Tensor:
        """v = proj(r) (timm towers: the trunk's classifier head, then open_clip's head)."""
        if self._timm:
            return self.visual.head(self.visual.trunk.get_classifier()(raw))
        proj = getattr(self.visual, "proj", None) if self._vit else None
        return raw @ proj if proj is not None else raw

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(r(x), v(x)), both unnormalised."""
        raw = self.raw_features(images)
        return raw, self.project(raw)

    def set_precision(self, image: str = "fp32", text: str = "fp32") -> None:
        """run.precision / run.text_precision ("fp32", "bf16" or "fp16") as the towers' autocast dtypes
        (image_autocast, text_autocast). Set before anything caches text embeddings."""
        for name, value in (("image", image), ("text", text)):
            if value not in PRECISIONS:
                raise ValueError(f"set_precision: {name} precision '{value}' is not one of {', '.join(PRECISIONS)}")
        image_dtype, text_dtype = AUTOCAST_DTYPES[image], AUTOCAST_DTYPES[text]
        for tower, dtype in (("visual", image_dtype), ("text", text_dtype)):
            stored = self.frozen_storage.get(tower)
            if stored is not None and dtype != stored:
                raise ValueError(f"set_precision: the {tower} tower's frozen weights are stored in {stored} "
                                 f"(store_frozen_weights), which another precision cannot use; call "
                                 f"restore_frozen_weights() first, or build a fresh model")
        self.image_autocast, self.text_autocast = image_dtype, text_dtype

    def store_frozen_weights(self) -> dict:
        """Store each autocast tower's frozen GEMM weights in its autocast dtype, once, instead of
        autocast casting them every forward (model/frozen_cast.py: same results). After LoRA
        injection. Returns {tower: tensors cast}."""
        return frozen_cast.store_frozen(self)

    def restore_frozen_weights(self) -> int:
        """Undo store_frozen_weights: fp32 storage again (the values stay the rounded ones)."""
        return frozen_cast.restore_frozen(self)

    def logit_scale(self) -> torch.Tensor:
        """s = exp(logit_scale) (100 for OpenAI weights), clamped at 100 as CLIP does."""
        return self.clip.logit_scale.exp().clamp(max=100.0)

    # ------------------------------------------------------------------ text side
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def encode_text(self, tokens: torch.Tensor, truncate: bool = True, length: Optional[int] = None,
                    eot: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Text embeddings (unnormalised).

        With truncate=True the transformer runs only up to the longest prompt's end-of-text
        token. The causal mask makes every position blind to later ones, so this is exact.
        `length` (that token's position + 1) and `eot` (each prompt's end-of-text position) may be
        given, computed once on the CPU tokens (as prompt_tokens does): otherwise the length is read
        back from `tokens`, a host sync when they are on a GPU.
        With `text_autocast` set (run.text_precision=bf16 / fp16) the transformer runs under that autocast
        and everything after it (ln_final, pooling, projection) in fp32, as the image tower's r(x); a
        tower the truncation does not apply to runs open_clip's encode_text whole under the autocast
        (projection included), its output cast to fp32.
        """
        if not (truncate and self.truncates_text):
            with _autocast_or_not(tokens.device.type, self.text_autocast):
                out = self.clip.encode_text(tokens)
            return out.float() if self.text_autocast is not None else out
        if eot is None:
            eot = tokens.argmax(dim=-1)
        if length is None:
            length = int(eot.max().item()) + 1
        return self.text_features(tokens[:, :length], eot)

    @property
    def truncates_text(self) -> bool:
        """Whether the text tower may run only up to the longest prompt's end-of-text token: exact for
        argmax (end-of-text) pooling behind a causal mask (CLIP keeps the pooling as text_pool_type, a
        TextTransformer of CustomTextCLIP as pool_type), with no class token or padding mask."""
        tower = self.text_tower
        pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
        return (getattr(tower, "cls_emb", None) is None and not getattr(tower, "use_pad_mask", False)
                and pool == "argmax" and getattr(tower, "attn_mask", None) is not None
                and hasattr(tower, "token_embedding"))

    def text_features(self, tokens: torch.Tensor, eot: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text embeddings of prompts already cut at the longest one's end-of-text token (a tower that
        `truncates_text`): token and positional embedding, the transformer over tokens.shape[1] positions,
        ln_final, the end-of-text row of each prompt (eot: its position), the projection; L2-normalised
        with `normalize`. Everything from the tokens on, in one function: under run.compile it is the text
        tower's one compiled graph per use (engine/compiling.py), its shapes symbolic."""
        tower = self.text_tower
        length = tokens.shape[1]
        cast_dtype = tower.transformer.get_cast_dtype()
        x = tower.token_embedding(tokens).to(cast_dtype)
        x = x + tower.positional_embedding[:length].to(cast_dtype)
        with _autocast_or_not(tokens.device.type, self.text_autocast):
            x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
        x = tower.ln_final(x.to(cast_dtype))
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        proj = tower.text_projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def prompt_tokens(self, prompts: Sequence[str], device: torch.device,
                      batch_size: int = 1024) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """The prompts tokenized, in chunks of `batch_size`: (tokens, end-of-text positions, truncated
        length) on `device`, the length an int computed on the CPU tokens; for a tower that
        `truncates_text` the tokens are already cut to that length (what text_features takes).

        Cached per (tokenizer, prompts, device, batch_size) (the last TOKEN_CACHE_SIZE sets): the training step
        embeds the same class prompts every step, and tokenizing them again each time costs Python
        (BPE, 100 tensors for 100 prompts), a pageable host-to-device copy and, to truncate, a read
        of the longest prompt's length back from the GPU, a sync that drains the launch queue."""
        if device.type == "cuda" and device.index is None:  # "cuda" means the device current now
            device = torch.device("cuda", torch.cuda.current_device())
        key = (tuple(prompts), str(device), batch_size, self.truncates_text)  # cut tokens or whole ones
        tokenizer, hit = self._token_cache.get(key, (None, None))
        if hit is not None and tokenizer is self.tokenizer:  # a tokenizer assigned anew: a miss
            self._token_cache.move_to_end(key)
            return hit
        # normal tensors even when made under torch.inference_mode (a zero-shot check): an inference
        # tensor cannot be saved for a later training step's backward (the end-of-text gather)
        with torch.inference_mode(False):
            tokens = self.tokenize(prompts)
            eot = tokens.argmax(dim=-1)
            hit = []
            for i in range(0, len(prompts), batch_size):
                chunk, chunk_eot = tokens[i:i + batch_size], eot[i:i + batch_size]
                length = int(chunk_eot.max()) + 1
                if self.truncates_text:  # the positions the transformer runs (text_features), copied alone
                    chunk = chunk[:, :length].contiguous()
                hit.append((chunk.to(device), chunk_eot.to(device), length))
        self._token_cache[key] = (self.tokenizer, hit)
        while len(self._token_cache) > TOKEN_CACHE_SIZE:
            self._token_cache.popitem(last=False)
        return hit

    def class_embeddings(self, prompts: Sequence[Sequence[str]], device=None,
                         batch_size: int = 1024) -> torch.Tensor:
        """u_c for each class: prompts[c] is that class's list of templated prompts.

        Each prompt embedding is L2-normalised, averaged over the class's prompts, normalised again.
        Returns (C, d), gradients flow (call under no_grad where not training).
        """
        device = torch.device(device or next(self.parameters()).device)
        flat = [p for plist in prompts for p in plist]
        counts = [len(plist) for plist in prompts]
        chunks = self.prompt_tokens(flat, device, batch_size)
        if self.truncates_text:  # one function from the tokens on (compiled: one graph)
            embs = [self.text_features(tokens, eot, normalize=True) for tokens, eot, _ in chunks]
        else:
            embs = [F.normalize(self.encode_text(tokens, truncate=False), dim=-1) for tokens, _, _ in chunks]
        embs = embs[0] if len(embs) == 1 else torch.cat(embs)
        if all(c == 1 for c in counts):
            return embs
        if len(set(counts)) == 1:  # one template set for every class: one mean, not one launch per class
            return F.normalize(embs.view(len(counts), counts[0], -1).mean(1), dim=-1)
        per_class = torch.split(embs, counts)
        return F.normalize(torch.stack([e.mean(0) for e in per_class]), dim=-1)


_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------- loading

def names_a_file(pretrained: Optional[str]) -> bool:
    """Whether model.pretrained names a local weights file (rather than an open_clip tag or none)."""
    if not pretrained:
        return False
    path = Path(os.path.expanduser(pretrained))
    return path.is_file() or os.sep in pretrained or path.suffix in (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _resolve_pretrained(name: str, pretrained: Optional[str], cache_dir: Optional[str]) -> Optional[str]:
    """Return what to hand to open_clip: None (random init), a local file path, or a cached tag."""
    import open_clip
    if pretrained in (None, "", "none", "random"):
        return None
    bundled = BUNDLED_WEIGHTS.get((name, pretrained))
    if bundled is not None:
        if not bundled.exists():
            raise ModelLoadError(f"the bundled checkpoint {bundled} is missing from the installation; "
                                 f"reinstall segpcl_fast or regenerate it with scripts/pretrain_tiny_clip.py")
        return str(bundled)
    path = Path(os.path.expanduser(pretrained))
    if path.is_file():  # absolute: open_clip takes a bare name it has as a tag for the tag (a download), not the file
        return str(path.absolute())
    if path.is_dir():
        raise ModelLoadError(f"model.pretrained='{pretrained}' is a directory; give the checkpoint file "
                             f"inside it (e.g. {path / 'open_clip_pytorch_model.bin'})")
    if names_a_file(pretrained):
        raise ModelLoadError(f"weights file '{pretrained}' (model.pretrained) does not exist; give an existing file "
                             f"path (moved: --set model.pretrained=NEW_PATH) or an open_clip pretrained tag for {name}")
    tags = [tag for model, tag in BUNDLED_WEIGHTS if model == name] + open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        bundled_elsewhere = [model for model, tag in BUNDLED_WEIGHTS if tag == pretrained and model != name]
        hint = (f" ('{pretrained}' is the weights of {bundled_elsewhere[0]}, the offline default: set model.pretrained "
                "too, or model.pretrained=none for random weights)" if bundled_elsewhere else "")
        raise ModelLoadError(f"unknown pretrained tag '{pretrained}' for model '{name}'{hint}; "
                             f"known tags: {tags or 'none (pass a local checkpoint path)'}")
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    in_hub = _hf_cached(cfg, cache_dir)
    url_file = None if in_hub else _cached_url_file(cfg, cache_dir)
    if url_file is not None:
        # open_clip would ask the (offline) hub first, and its weights-only torch.load refuses OpenAI's
        # TorchScript files (clip.load's ~/.cache/clip/ViT-B-16.pt): load_model reads the file itself
        return url_file
    if not in_hub:
        raise ModelLoadError(
            f"weights for {name} / {pretrained} are not available offline (not in the open_clip / "
            f"Hugging Face cache{' ' + cache_dir if cache_dir else ''}). Either download them on a "
            f"machine with internet (python -c \"import open_clip; open_clip.create_model('{name}', "
            f"pretrained='{pretrained}')\") and copy the cache here, or pass a local checkpoint file: "
            f"model.pretrained=/path/to/weights.pt")
    return pretrained


def _in_hf_cache(repo: str, filename: str, cache_dir: Optional[str]) -> bool:
    """True if `filename` of Hugging Face repo `repo` is in the local cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        hit = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
    except Exception:  # no huggingface_hub, or a repo id it rejects
        return False
    return isinstance(hit, str) and os.path.exists(hit)


def _hf_cached(cfg: dict, cache_dir: Optional[str]) -> bool:
    """True if the tag's Hugging Face hub weights are in the local cache."""
    hf_hub = cfg.get("hf_hub", "")
    if not hf_hub:
        return False
    repo = "/".join(hf_hub.strip("/").split("/")[:2])
    return any(_in_hf_cache(repo, f, cache_dir) for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))


def _cached_url_file(cfg: dict, cache_dir: Optional[str]) -> Optional[str]:
    """The tag's URL download where it lies (open_clip's and OpenAI clip.load's cache, ~/.cache/clip), else None."""
    url = cfg.get("url", "")
    if not url:
        return None
    path = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
    return path if os.path.isfile(path) else None


@contextlib.contextmanager
def _hf_hub_offline():
    """No network while open_clip loads. huggingface_hub reads HF_HUB_OFFLINE once, at its import
    (already done by open_clip), so the module constant is switched as well as the variable."""
    old_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hf_constants
    except ImportError:
        hf_constants = None
    old_const = getattr(hf_constants, "HF_HUB_OFFLINE", None)
    if hf_constants is not None:
        hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if hf_constants is not None:
            hf_constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _require_cached_hf_config(name: str, cache_dir: Optional[str]) -> None:
    """An hf-hub: model needs its open_clip_config.json in the local Hugging Face cache."""
    if not _in_hf_cache(name[len("hf-hub:"):].strip("/"), "open_clip_config.json", cache_dir):
        raise ModelLoadError(
            f"'{name}' is not in the local Hugging Face cache and weights are never downloaded at run "
            f"time. On a machine with internet run python -c \"import open_clip; open_clip.create_model("
            f"'{name}')\" and copy ~/.cache/huggingface here (or set model.cache_dir); the weights come "
            f"with the model, so keep model.pretrained=null for hf-hub: names")


def load_model(name: str = "segpcl-tiny", pretrained: Optional[str] = "segpcl-world",
               device: str | torch.device = "cpu", cache_dir: Optional[str] = None,
               preprocess: Optional[str | Mapping] = None) -> CLIPModel:
    """Load an open_clip model by name with a pretrained tag, a local checkpoint path, or None.

    `preprocess` (model.preprocess) overrides the image preprocessing open_clip picks for these weights:
    a pretrained tag of `name` (its mean, std, interpolation, resize_mode: for a local copy of that
    tag's weights, which open_clip would give the model config's), or a mapping of those keys.

    Raises ModelLoadError with the fix when the model name is unknown, the checkpoint is missing or
    does not fit the model, the weights are not available offline, or `preprocess` names no tag of it.
    """
    import open_clip
    check_model_name(name)
    resolved = _resolve_pretrained(name, pretrained, cache_dir)
    tag_as_file = resolved is not None and resolved != pretrained and _is_open_clip_tag(name, pretrained)
    # a tag read from its downloaded file keeps the tag's preprocessing, as open_clip gives it by tag
    force_preprocess = preprocess_override(name, pretrained if preprocess is None and tag_as_file else preprocess)
    if resolved is None and pretrained not in (None, "", "none", "random"):
        raise ModelLoadError(f"could not resolve pretrained weights '{pretrained}' for {name}")
    if resolved is None:
        log.warning("model %s created with random weights (model.pretrained is None)", name)
    if name.startswith("hf-hub:"):
        _require_cached_hf_config(name, cache_dir)
    tokenizer = _tokenizer(name)  # first: a tokenizer missing offline fails before a large model is built
    quick_gelu = weights_quick_gelu(name, pretrained, resolved)
    if quick_gelu:
        log.info("%s with pretrained='%s': built with QuickGELU, the activation these weights were trained with "
                 "(open_clip's config for the name has GELU; %s-quickgelu is the same model)", name, pretrained, name)
    scripted = resolved is not None and os.path.isfile(resolved) and _is_torchscript_archive(resolved)
    if resolved and os.path.isfile(resolved):
        try:  # open_clip's torch.load reads a record with changed bytes as if nothing were wrong
            check_torch_zip(resolved)
        except DamagedFileError as e:
            raise ModelLoadError(f"could not load {name} with pretrained='{pretrained}': '{resolved}' {e}; copy or "
                                 "download the weights again") from None
    try:
        if scripted:  # OpenAI's release format: its weights into open_clip's model, as open_clip's weights-only load cannot
            with _hf_hub_offline(), _quiet_random_init(), open_clip_call():
                clip = open_clip.create_model(name, pretrained=None, cache_dir=cache_dir, device=device,
                                              force_preprocess_cfg=force_preprocess, force_quick_gelu=quick_gelu)
            clip.load_state_dict(torchscript_state_dict(resolved, clip), strict=True)
        else:
            with _hf_hub_offline(), open_clip_call():
                clip = open_clip.create_model(name, pretrained=resolved, cache_dir=cache_dir, device=device,
                                              force_preprocess_cfg=force_preprocess, force_quick_gelu=quick_gelu)
    except Exception as e:  # a corrupt file fails in pickle / zipfile / safetensors, not only torch
        raise ModelLoadError(_load_failure(name, pretrained, resolved, e)) from e
    clip.eval()
    return CLIPModel(clip, tokenizer, name, pretrained)


def torchscript_state_dict(path: str, model: nn.Module) -> dict:
    """The weights of a TorchScript CLIP archive (OpenAI's ViT-B-16.pt) as `model`'s state dict: OpenAI's names are
    open_clip's; the archive's int attributes (input_resolution, context_length, vocab_size) and the buffers open_clip
    keeps out of its state dict (attn_mask) are dropped, as open_clip's own loader drops them."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        archive = torch.jit.load(path, map_location="cpu")
    own = model.state_dict()
    buffers = dict(model.named_buffers())
    return {k: v for k, v in archive.state_dict().items()
            if k in own or k not in buffers and k not in ("input_resolution", "context_length", "vocab_size")}


def _is_open_clip_tag(name: str, pretrained: Optional[str]) -> bool:
    """`pretrained` is one of open_clip's tags for `name` (not a file, not a bundled tag)."""
    import open_clip
    return (pretrained is not None and not os.path.isfile(os.path.expanduser(pretrained))
            and pretrained in open_clip.list_pretrained_tags_by_model(name))


def weights_quick_gelu(name: str, pretrained: Optional[str], resolved: Optional[str]) -> bool:
    """Whether `name` must be built with QuickGELU (x sigmoid(1.702 x)) for these weights although its open_clip
    config has GELU: a pretrained tag trained with it (open_clip's pretrained config says quick_gelu: OpenAI's CLIPs,
    e.g. ViT-B-16 / openai, and some others), or a local TorchScript archive (OpenAI's own release format,
    ViT-B-16.pt). open_clip (2.x and 3.x) builds such a pair with GELU and only warns, which is not the pretrained
    model: every MLP activation of both towers differs. A local state dict says nothing of its activation: the
    name's config decides (ViT-B-16-quickgelu for OpenAI's weights)."""
    import open_clip
    if resolved is None or (name, pretrained) in BUNDLED_WEIGHTS or config_quick_gelu(name):
        return False
    if _is_open_clip_tag(name, pretrained):
        return bool((open_clip.get_pretrained_cfg(name, pretrained) or {}).get("quick_gelu"))
    return os.path.isfile(resolved) and _is_torchscript_archive(resolved)


def _is_torchscript_archive(path: str) -> bool:
    """A torch.jit.save zip (constants.pkl and code/ beside data.pkl), which open_clip loads as weights."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as archive:
            return any(entry.endswith("/constants.pkl") for entry in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def config_quick_gelu(name: str) -> bool:
    """Whether open_clip's config for `name` builds QuickGELU (the -quickgelu names)."""
    import open_clip
    return bool((open_clip.get_model_config(name) or {}).get("quick_gelu"))


def _tokenizer(name: str):
    """open_clip's tokenizer for `name`, offline. Some (SigLIP's, hf_tokenizer_name) come from the
    Hugging Face hub: not cached, that is one error saying how to cache them."""
    import open_clip
    try:
        with _hf_hub_offline(), open_clip_call():
            return open_clip.get_tokenizer(name)
    except Exception as e:
        hub = ((open_clip.get_model_config(name) or {}).get("text_cfg") or {}).get("hf_tokenizer_name")
        where = (f"its tokenizer comes from the Hugging Face hub ('{hub}') and is not in the local cache; on a "
                 f"machine online run `python -c \"import open_clip; open_clip.get_tokenizer('{name}')\"` and copy "
                 f"~/.cache/huggingface here (or set HF_HOME to a copy)") if hub else "its tokenizer does not load"
        raise ModelLoadError(f"could not load {name}: {where} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e


def preprocess_override(name: str, preprocess: Optional[str | Mapping]) -> Optional[dict]:
    """model.preprocess as open_clip's force_preprocess_cfg: None (open_clip decides), the preprocess
    keys that tag `preprocess` of model `name` sets (those open_clip merges when it loads that tag), or
    the mapping's keys."""
    if preprocess is None:
        return None
    if not isinstance(preprocess, str):
        unknown = sorted(set(preprocess) - set(PREPROCESS_KEYS))
        if unknown:
            raise ModelLoadError(f"model.preprocess has unknown key(s) {unknown}; it takes {list(PREPROCESS_KEYS)}")
        return {k: (tuple(v) if k in ("mean", "std") else v) for k, v in preprocess.items() if v is not None}
    import open_clip
    tag_cfg = open_clip.get_pretrained_cfg(name, preprocess)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        known = f"its tags: {tags}" if tags else "it has no pretrained tags in open_clip"
        raise ModelLoadError(f"model.preprocess='{preprocess}' is no pretrained tag of {name} ({known}); give one "
                             f"of them, a mapping of {list(PREPROCESS_KEYS)}, or null for open_clip's choice")
    return {k: tag_cfg[k] for k in PREPROCESS_KEYS if tag_cfg.get(k) is not None}


def check_model_name(name: str) -> None:
    """Raise ModelLoadError, with the closest registered names, when open_clip knows no model `name`
    (load_model's first check; train asks it before its header line and before any data loads)."""
    import open_clip
    register_model_configs()
    if name.startswith("local-dir:") and not hasattr(open_clip.factory, "LOCAL_DIR_PREFIX"):
        raise ModelLoadError(f"model '{name}': open_clip_torch {open_clip.__version__} has no local-dir: models "
                             f"(open_clip_torch 3.0 added them): upgrade open_clip_torch, or give the folder's "
                             f"open_clip_config.json's model name as model.name and its weights file as "
                             f"model.pretrained")
    known = open_clip.list_models()
    if not _is_known_model(name, known):
        close = difflib.get_close_matches(name, known, n=5)
        hint = f"did you mean {close}? " if close else ""
        raise ModelLoadError(f"unknown model '{name}'; {hint}(open_clip.list_models() lists all)")


def _is_known_model(name: str, known: Sequence[str]) -> bool:
    """A registered open_clip config, or a name open_clip resolves itself (Hugging Face hub, local dir)."""
    return name in known or name.startswith(("hf-hub:", "local-dir:"))


def configs_fitting(state: Mapping) -> list[str]:
    """The registered open_clip configs (open_clip ViT image tower, open_clip text tower) whose sizes an open_clip
    state_dict has, read off its tensors as OpenAI's clip.build_model does: image width, patch size, image size
    and depth; text width, depth, context length and vocabulary; embedding width. [] for other towers (timm,
    Hugging Face) or keys not open_clip's. A file's tensors say nothing of the activation: a -quickgelu config
    and its plain twin both fit."""
    state = state.get("state_dict", state)
    if not isinstance(state, Mapping):
        return []
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(k, str) and hasattr(v, "shape")}
    needed = {"visual.conv1.weight": 4, "visual.positional_embedding": 2, "visual.proj": 2,
              "token_embedding.weight": 2, "positional_embedding": 2, "text_projection": 2}  # key: its dims
    if any(len(getattr(state.get(k), "shape", ())) != dims for k, dims in needed.items()) \
            or state["visual.positional_embedding"].shape[0] < 2:
        return []

    def depth(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})
    width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    found = {"vision": (width, patch, grid * patch, depth("visual.transformer.resblocks.")),
             "text": (state["token_embedding.weight"].shape[1], depth("transformer.resblocks."),
                      state["positional_embedding"].shape[0], state["token_embedding.weight"].shape[0]),
             "embed_dim": state["text_projection"].shape[-1]}
    import open_clip
    fitting = []
    for model_name in open_clip.list_models():
        cfg = open_clip.get_model_config(model_name) or {}
        vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
        if vision.get("timm_model_name") or text.get("hf_model_name") or not isinstance(vision.get("layers"), int):
            continue
        image_size = vision.get("image_size", 224)
        image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
        sizes = {"vision": (vision.get("width", 768), vision.get("patch_size", 16), image_size, vision["layers"]),
                 "text": (text.get("width", 512), text.get("layers", 12), text.get("context_length", 77),
                          text.get("vocab_size", 49408)),
                 "embed_dim": cfg.get("embed_dim")}
        if sizes == found:
            fitting.append(model_name)
    return fitting


def _load_failure(name: str, pretrained: Optional[str], resolved: Optional[str], error: Exception) -> str:
    """Why `open_clip.create_model` failed on these weights, and the fix, in one message (torch's
    own text for a file that is no checkpoint suggests weights_only=False and filing an issue)."""
    head = f"could not load {name} with pretrained='{pretrained}'"
    if resolved and os.path.isfile(resolved) and _is_torchscript_archive(resolved):  # read whole by torch.jit.load
        detail = " ".join(str(error).splitlines()[:3])[:600]
        return (f"{head}: {type(error).__name__}: {detail}. '{resolved}' is a TorchScript archive (OpenAI's CLIP "
                f"release format): check it holds the weights of this model ({name})")
    if resolved and os.path.isfile(resolved):
        try:
            state = load_torch_file(resolved)  # weights_only: a file open_clip refused must not run code here
        except UnsafeFileError as e:
            return f"{head}: {e}; give an open_clip state_dict file (.pt/.bin/.safetensors)"
        except Exception as e:
            return (f"{head}: '{resolved}' is not a checkpoint torch can read ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200]}); give an open_clip state_dict file (.pt/.bin/.safetensors)")
        if isinstance(state, dict) and {"lora", "learner"} <= set(state):
            return (f"{head}: '{resolved}' is a segpcl_fast run checkpoint (checkpoints/task_NN.pt), not CLIP "
                    f"weights; continue that run with --resume, re-evaluate it with `segpcl-fast evaluate RUN_DIR`, "
                    f"or use it with segpcl_fast.load_classifier(path); model.pretrained takes the base CLIP weights")
        detail = str(error).splitlines()
        fits = [n for n in configs_fitting(state) if n != name] if isinstance(state, dict) else []
        more = " and others" if len(fits) > 6 else ""
        guess = f"; its tensor sizes are those of open_clip's {', '.join(fits[:6])}{more}: name that as model.name"
        detail = " ".join(detail[:3])[:600]
        stop = "" if detail.endswith((".", "!")) else "."
        return (f"{head}: {type(error).__name__}: {detail}{stop} Check it is a state_dict saved from the same model "
                f"config ({name}){guess if fits else ''}")
    return f"{head}: {type(error).__name__}: {error}"


def model_from_state_dict(name: str, state_dict: dict, device: str | torch.device = "cpu",
                          pretrained: Optional[str] = None, quick_gelu: bool = False) -> CLIPModel:
    """An open_clip model `name` holding `state_dict` (e.g. merged weights from an export), strict.

    `pretrained` only labels where the weights came from; `quick_gelu` builds QuickGELU where the name's
    config has GELU (CLIPModel.quick_gelu of the model the weights come from: OpenAI's). Raises ModelLoadError
    when the name is unknown or the weights do not fit the model's config.
    """
    import open_clip
    register_model_configs()
    if not _is_known_model(name, open_clip.list_models()):
        raise ModelLoadError(f"unknown model '{name}': register its open_clip config (open_clip.add_model_config) "
                             f"before loading weights made for it")
    try:
        with _hf_hub_offline(), _quiet_random_init(), open_clip_call():
            clip = open_clip.create_model(name, pretrained=None, device=device, force_quick_gelu=quick_gelu)
        clip.load_state_dict(state_dict, strict=True)
    except Exception as e:
        raise ModelLoadError(f"could not build {name} from the given weights: {type(e).__name__}: {e}") from e
    clip.eval()
    return CLIPModel(clip, _tokenizer(name), name, pretrained)


@contextlib.contextmanager
def open_clip_call():
    """Around an open_clip call that builds a model or tokenizer, two pieces of the caller's process state kept:
    the model is built in float32 whatever torch.get_default_dtype() the caller set (float64 weights met fp32
    images: a dtype error, or a run's probe embeddings that no longer matched), and open_clip's module-level
    logging.info / logging.warning do not install a root handler where the caller has none (logging.basicConfig,
    which they call then, made the caller's own basicConfig do nothing). The guard there is logging's own
    last-resort handler: warnings and errors print as they would with no handler, info does not."""
    with _held_root_guard(), float32_default():
        yield


class _HeldWhileAny:
    """A process-wide setting held while any block holds it (blocks in threads may overlap): `take()` when no
    holder has taken it yet (it returns what `give_back` needs, or None: nothing taken, asked again by the next
    block), `give_back(taken)` when the last block ends."""

    def __init__(self, take: Callable[[], object], give_back: Callable[[object], None]):
        self._take, self._give_back = take, give_back
        self._lock, self._holders, self._taken = threading.Lock(), 0, None

    @contextlib.contextmanager
    def __call__(self):
        with self._lock:
            if self._taken is None:
                self._taken = self._take()
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0 and self._taken is not None:
                    self._give_back(self._taken)
                    self._taken = None


def _guard_root_logger() -> Optional[logging.Handler]:
    """logging.lastResort on the root logger where it has no handler (None where it has one), so that
    logging.info / logging.warning do not call logging.basicConfig."""
    if logging.getLogger().handlers:
        return None
    guard = logging.lastResort or logging.NullHandler()
    logging.getLogger().addHandler(guard)
    return guard


def _take_float32_default() -> torch.dtype:
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    return dtype


_held_root_guard = _HeldWhileAny(_guard_root_logger, lambda guard: logging.getLogger().removeHandler(guard))
# `with float32_default():` torch's default dtype float32 in the block, the caller's after: models, LoRA factors
# and probe images are made in float32 whatever the caller set (torch.set_default_dtype(torch.float64) built a
# float64 model). The default is the process's, not a thread's: while a block runs, other threads' new tensors
# are float32 too; overlapping blocks (threads) give the caller's dtype back when the last one ends.
float32_default = _HeldWhileAny(_take_float32_default, torch.set_default_dtype)


@contextlib.contextmanager
def _quiet_random_init():
    """Drop open_clip's "initialized randomly" warning: the weights are loaded right after."""
    def keep(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()
    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)
