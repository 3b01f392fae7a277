"""A tower's frozen GEMM operands stored in its autocast dtype (run.precision / text_precision = bf16 or fp16).

Under autocast every F.linear casts its fp32 weight and bias to bf16 (fp16 alike; bf16 below), on every call: the frozen
weights of a CLIP tower are cast again each forward, one small kernel per tensor (ViT-B/16's image
tower: 135 tensors, 87.8 M fp32 parameters read to write their bf16 copies; inductor generated 134
fewer kernels for a training step with them stored, benchmarks/compiled_kernel_count.py). They
never change, so storing them in bf16 once gives the GEMMs the very operands autocast would have made (the same round-to-nearest-even cast): eager results are bit for bit the
same, and the tower's frozen GEMM weights take half the memory. Under inductor, whose default
(torch._inductor.config.emulate_precision_casts off) may fuse a cast into the operation after it
without rounding, fp32 storage compiles to slightly other numbers than eager (a ViT-B/16 step's loss
240.6389 against eager's 240.6028 on the CPU) and bf16 storage to others again (240.6183); with
emulate_precision_casts on both give 240.6013 (BENCHMARKS.md, session 42).

Which tensors: inside the tower's transformer blocks, the frozen operands of matrix products
only: nn.Linear weights and biases, and the LoRA modules' W, b and A (B is trained: its fp32
master stays, autocast casts it each step); a ViT's patch embedding (conv1), and its class and
positional embeddings, which open_clip casts to the patch embedding's (autocast) dtype before adding
them. Not: layer norms (autocast runs them in fp32), the text tower's token and positional
embeddings (open_clip adds them in `transformer.get_cast_dtype()`, which keeps answering fp32), the
projections after the tower (run in fp32, outside autocast), plain nn.MultiheadAttention (left to
torch's own paths).

`store_frozen(model)` after LoRA injection (model/lora.py refuses to inject into a model stored so:
B would take W's dtype); `restore_frozen(model)` casts them back to fp32 (their values stay the
bf16-rounded ones the run used), for merged exports. SEGPCL_FROZEN_CAST=per_call keeps fp32
storage and autocast's per-call casts (for A/B timing).
"""
from __future__ import annotations

import logging
from typing import Iterator

import torch
import torch.nn as nn

from ..ops.dispatch import env_choice

log = logging.getLogger("segpcl_fast.model")

CHOICES = ("once", "per_call")
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)  # what autocast casts (float64 it leaves alone)


def choice() -> str:
    """SEGPCL_FROZEN_CAST: "once" (default: stored in the autocast dtype) or "per_call" (autocast casts)."""
    return env_choice("SEGPCL_FROZEN_CAST", CHOICES, "once")


def _tower_roots(model, tower: str) -> list[nn.Module]:
    """The parts of a tower that run whole under its autocast: the transformer blocks (and a ViT's
    patch embedding). Not the modules around them that run in fp32 (pooling, projections)."""
    if tower == "text":
        trunk = getattr(model.text_tower, "transformer", None)
        return [trunk] if isinstance(trunk, nn.Module) else []
    visual = model.visual
    roots = [getattr(visual, name, None) for name in ("conv1", "transformer")]  # open_clip's ViT
    trunk = getattr(visual, "trunk", None)
    if isinstance(getattr(trunk, "blocks", None), nn.Module):  # timm (open_clip's TimmModel)
        roots.append(trunk.blocks)
    return [r for r in roots if isinstance(r, nn.Module)]


def _modules(module: nn.Module) -> Iterator[nn.Module]:
    """module and its descendants, except what a plain nn.MultiheadAttention holds (torch's own
    attention paths read its weights, one of them without autocast's casts)."""
    if isinstance(module, nn.MultiheadAttention):
        return
    yield module
    for child in module.children():
        yield from _modules(child)


def _owners(model, tower: str) -> Iterator[tuple[nn.Module, tuple[str, ...]]]:
    """(module, names of its tensors that run only as autocast-cast operands) over `tower`."""
    from .lora import LoRABLinear, LoRAMultiheadAttention, LoRAPackedLinear
    kinds = ((LoRAMultiheadAttention, ("in_proj_weight", "in_proj_bias", "lora_A")),
             ((LoRABLinear, LoRAPackedLinear), ("weight", "bias", "lora_A")),
             ((nn.Linear, nn.Conv2d), ("weight", "bias")))
    if tower == "visual" and hasattr(model.visual, "_embeds"):  # open_clip's ViT: cast to conv1's dtype
        yield model.visual, ("class_embedding", "positional_embedding")
    for root in _tower_roots(model, tower):
        for module in _modules(root):
            yield module, next((attrs for kind, attrs in kinds if isinstance(module, kind)), ())


def frozen_operands(model, tower: str) -> Iterator[tuple[nn.Module, str, torch.Tensor]]:
    """(module, attribute, tensor) of each frozen autocast operand of `tower` ("visual" or "text")."""
    seen = set()
    for module, attrs in _owners(model, tower):
        for attr in attrs:
            t = getattr(module, attr, None)
            if isinstance(t, torch.Tensor) and t.dtype in _CASTABLE and not t.requires_grad and id(t) not in seen:
                seen.add(id(t))
                yield module, attr, t


def _cast(tensors, dtype: torch.dtype) -> int:
    """Cast each tensor's storage in place (a Parameter stays the same object: modules sharing it,
    and the state dict's names, are unchanged). Returns how many changed."""
    changed = 0
    for _module, _attr, t in tensors:
        if t.dtype != dtype:
            t.data = t.data.to(dtype)
            changed += 1
    return changed


def store_frozen(model) -> dict:
    """Store the frozen GEMM operands of each tower that runs under autocast (CLIPModel.image_autocast,
    text_autocast) in that dtype. Returns {tower: tensors cast}; records the dtypes in
    model.frozen_storage. Nothing when SEGPCL_FROZEN_CAST=per_call."""
    if choice() == "per_call":
        return {}
    done = {}
    for tower, dtype in (("visual", model.image_autocast), ("text", model.text_autocast)):
        if dtype is None:
            continue
        # open_clip casts the text tower's input to get_cast_dtype(), which reads a block's weight dtype:
        # what it answers before the cast is what it must keep answering
        answered = [(root, root.get_cast_dtype()) for root in _tower_roots(model, tower)
                    if callable(getattr(root, "get_cast_dtype", None)) and "get_cast_dtype" not in vars(root)]
        done[tower] = _cast(list(frozen_operands(model, tower)), dtype)
        if done[tower]:  # (a tower with no blocks this knows, e.g. a ConvNeXt trunk, keeps its storage)
            model.frozen_storage[tower] = dtype
            for root, cast_dtype in answered:
                root.get_cast_dtype = _CastDtype(cast_dtype)
    if done:
        log.info("frozen GEMM weights stored in the autocast dtype (cast once, not every forward): %s",
                 {tower: f"{n} tensors in {model.frozen_storage.get(tower)}" for tower, n in done.items()})
    return done


def restore_frozen(model, dtype: torch.dtype = torch.float32) -> int:
    """Cast what store_frozen stored back to `dtype` (fp32: open_clip's own), their values the rounded
    ones the run used. Returns how many tensors changed."""
    changed = 0
    for tower in list(model.frozen_storage):
        changed += _cast(list(frozen_operands(model, tower)), dtype)
        for root in _tower_roots(model, tower):
            if isinstance(vars(root).get("get_cast_dtype"), _CastDtype):
                del root.get_cast_dtype
    model.frozen_storage.clear()
    return changed


class _CastDtype:
    """open_clip's Transformer.get_cast_dtype() for a tower stored in another dtype: the dtype it
    answered before (it reads a block's c_fc weight dtype; the text tower casts its token and
    positional embeddings to that before the blocks, and its output after them). Bound on the
    instance, as every open_clip version calls `self.transformer.get_cast_dtype()`."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __call__(self) -> torch.dtype:
        return self.dtype
