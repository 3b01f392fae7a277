"""Our LoRA-B-only adapters as a peft adapter (and back to plain modules without folding them in).

unload_lora(model) is peft's `unload()`: each adapter replaced by the plain module it wraps, the
base weights untouched (merge_lora folds s B A in instead).

to_peft(model) builds a peft PeftModel over a copy of the plain open_clip model whose adapters
compute what ours compute, and save_peft_adapter writes it with peft's own `save_pretrained`
(adapter_config.json + adapter_model.safetensors), so that

    clip = open_clip.create_model(name, pretrained=...)
    clip = peft.PeftModel.from_pretrained(clip, directory)

is the run's model. The arrangements map one to one:
  LoRABLinear (c_fc, c_proj, timm's q_proj / proj / fc1 / fc2 ...)  -> peft Linear, rank r
  LoRAPackedLinear (timm's packed qkv, n adapted slices)             -> peft Linear, rank n*r:
      lora_A = A_cat (n*r x in), lora_B = B_full (3d x n*r, pack_slices)
  LoRAMultiheadAttention (open_clip's attention, n adapted slices)   -> peft MultiheadAttention, rank
      R = max(n, 1) * r on in_proj (A_cat, B_full) and on its out_proj (peft adapts both with one
      rank): an out_proj adapter's A and B zero-padded to R, none adapted there: A = B = 0
and lora_alpha = (alpha / r) * R keeps each layer's scaling alpha / r (peft's scaling is
lora_alpha / rank), set per module through peft's rank_pattern / alpha_pattern.
"""
from __future__ import annotations

import copy
import functools
import errno
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..fileio import chmod_tree_like_made, unwritable_dir_reason
from .clip import config_quick_gelu, open_clip_resolves
from .lora import LoRABLinear, LoRAMultiheadAttention, LoRAPackedLinear, outer_adapters, replace_adapters

PEFT_FIX = "pip install 'peft>=0.15' (peft adapts nn.MultiheadAttention from 0.15 on; or segpcl_fast's extra [peft])"
BASE_MODEL_FILE = "segpcl_base_model.json"  # which open_clip model the adapter goes on (peft's config cannot say)


def _plain_linear(module: Union[LoRABLinear, LoRAPackedLinear, nn.Linear]) -> nn.Linear:
    """An nn.Linear holding the adapter's own frozen weight and bias (the same Parameters, no copy)."""
    if not isinstance(module, (LoRABLinear, LoRAPackedLinear)):
        return module
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    linear.weight, linear.bias = module.weight, module.bias
    return linear


def _plain_attention(module: LoRAMultiheadAttention) -> nn.MultiheadAttention:
    """The nn.MultiheadAttention (batch_first, as open_clip builds it) with the adapter's own frozen
    in_proj and out_proj Parameters."""
    bias = module.in_proj_bias is not None
    mha = nn.MultiheadAttention(module.embed_dim, module.num_heads, bias=bias, batch_first=True, device="meta")
    mha.in_proj_weight, mha.in_proj_bias = module.in_proj_weight, module.in_proj_bias
    out = _plain_linear(module.out_proj)
    mha.out_proj.weight, mha.out_proj.bias = out.weight, out.bias
    return mha


def unload_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRA adapter by the plain module it wraps, in place, without folding s B A in
    (peft's `unload()`; merge_lora is `merge_and_unload()`), and return the model: the pretrained
    function again, sharing the frozen weights. Frozen weights stored in bf16 / fp16
    (CLIPModel.store_frozen_weights) go back to fp32 storage first, as in merge_lora."""
    def plain(module: nn.Module) -> nn.Module:
        unloaded = _plain_attention(module) if isinstance(module, LoRAMultiheadAttention) else _plain_linear(module)
        # eval: nn.MultiheadAttention's fused inference path, as the original's
        return unloaded.train(module.training).requires_grad_(False)
    return replace_adapters(model, plain)


def _pad(t: torch.Tensor, rows: int = 0, cols: int = 0) -> torch.Tensor:
    return F.pad(t, (0, cols, 0, rows))


def peft_layers(model: nn.Module) -> dict[str, dict]:
    """Per adapted module (name in the plain model): peft's rank for it and the lora_A / lora_B
    weights that give our adapter's function at scaling alpha / r ("out_A" / "out_B": an attention's
    out_proj)."""
    layers = {}
    for name, m in outer_adapters(model):
        if isinstance(m, LoRABLinear):
            layers[name] = {"rank": m.rank, "scaling": m.scaling, "A": m.lora_A, "B": m.lora_B}
        elif isinstance(m, LoRAPackedLinear):
            layers[name] = {"rank": len(m.slices) * m.rank, "scaling": m.scaling, "A": m.lora_A,
                            "B": m.packed_lora_B()}
        else:
            d, r, n = m.embed_dim, m.rank, len(m.slices)
            big = max(n, 1) * r
            w = m.in_proj_weight
            in_A = m.lora_A if n else w.new_zeros(big, d)
            in_B = m.packed_lora_B() if n else w.new_zeros(3 * d, big)
            if isinstance(m.out_proj, LoRABLinear):
                out_A, out_B = _pad(m.out_proj.lora_A, rows=big - r), _pad(m.out_proj.lora_B, cols=big - r)
            else:
                out_A, out_B = w.new_zeros(big, d), w.new_zeros(d, big)
            layers[name] = {"rank": big, "scaling": m.scaling, "A": in_A, "B": in_B, "out_A": out_A, "out_B": out_B}
    return layers


@functools.lru_cache(maxsize=None)
def peft_adds_out_proj_twice() -> bool:
    """Whether the installed peft's LoRA nn.MultiheadAttention adds its out_proj delta twice in the
    forward (merge adds W + dW, then out_proj.merge adds dW again: huggingface/peft pull 3774, open in
    peft 0.21). Probed on a 4-wide attention with only an out_proj adapter, in float64."""
    import peft

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 1, batch_first=True, dtype=torch.float64)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        plain, x = One(), torch.randn(1, 3, 4, dtype=torch.float64)
        wrapped = peft.get_peft_model(copy.deepcopy(plain), peft.LoraConfig(r=1, lora_alpha=1, target_modules=["attn"],
                                                                            init_lora_weights=False))
    attn = wrapped.base_model.model.attn
    out = attn.get_base_layer().out_proj
    with torch.no_grad():
        attn.lora_B[attn.active_adapters[0]].weight.zero_()
        adapter = out.active_adapters[0]
        plain.attn.out_proj.weight += out.lora_B[adapter].weight @ out.lora_A[adapter].weight
        once, got = plain(x), wrapped(x)
    return not torch.allclose(got, once, rtol=1e-9, atol=1e-12)


def _plain_clip(model: nn.Module) -> nn.Module:
    """The open_clip model inside a CLIPModel (segpcl_fast.load_model), or the open_clip model itself."""
    return model.clip if hasattr(model, "text_tower") and hasattr(model, "clip") else model


def import_peft():
    """(peft, peft.tuners.lora.layer), or one ImportError: peft missing, or installed but failing to import."""
    import importlib.util
    if importlib.util.find_spec("peft") is None:
        raise ImportError(f"a peft adapter needs peft: {PEFT_FIX}")
    try:
        import peft
        from peft.tuners.lora import layer as peft_lora_layer
    except Exception as e:  # a peft / transformers version mismatch raises all sorts
        raise ImportError(f"peft is installed but fails to import ({type(e).__name__}: {e}): repair it, e.g. "
                          f"{PEFT_FIX} with a transformers it supports") from e
    return peft, peft_lora_layer


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)  # lora_alpha / r computed back from lora_alpha = s * r


def to_peft(model: nn.Module, adapter_name: str = "default"):
    """A peft PeftModel over a copy of the plain open_clip model (of a CLIPModel: its .clip) with our
    adapters in peft's layers: the same function, the same frozen base weights. `model` is left as it was."""
    peft, peft_lora_layer = import_peft()
    clip = _plain_clip(model)
    adapters = outer_adapters(clip)
    if not adapters:
        raise ValueError("to_peft: the model has no LoRA adapters (an export holds them merged into its weights): "
                         "start from a run directory or checkpoint (load_classifier), or inject_lora first")
    needs_mha = any(isinstance(m, LoRAMultiheadAttention) for _, m in adapters)
    if needs_mha and not hasattr(peft_lora_layer, "MultiheadAttention"):
        raise ImportError(f"peft {peft.__version__} has no LoRA for nn.MultiheadAttention: {PEFT_FIX}")
    out_adapted = [name for name, m in adapters
                   if isinstance(m, LoRAMultiheadAttention) and isinstance(m.out_proj, LoRABLinear)]
    if out_adapted and peft_adds_out_proj_twice():
        raise NotImplementedError(
            f"peft {peft.__version__} adds an nn.MultiheadAttention's out_proj LoRA twice in its forward "
            f"(huggingface/peft pull 3774), and this model adapts out_proj in open_clip attention ({out_adapted[0]}, "
            f"lora.targets with 'out'): as a peft adapter it would compute another function. Export the merged "
            f"weights instead (ContinualClassifier.export / segpcl-fast export), or use a peft with that fix")
    eva = [name for name, m in clip.named_modules()
           if isinstance(getattr(m, "qkv", None), LoRAPackedLinear) and getattr(m, "q_bias", None) is not None]
    if eva:
        raise NotImplementedError(
            f"{eva[0]} is timm's attention with a fused qkv and separate q / v biases (EVA): unless qkv_bias_separate "
            f"is set, as inject_lora sets it, it reads qkv.weight directly and never calls a peft layer on qkv, so the "
            f"adapter would be dropped on a freshly created model; export the merged weights instead, or use "
            f"lora.targets without q, k, v")
    # peft's rank_pattern keys match as (.*\.)?KEY: the text tower's keys would also match the image tower's
    # names, harmless while both towers' adapters have one arrangement (inject_lora's); the check below holds it
    with torch.random.fork_rng(devices=[]):  # peft draws its own lora_A init, which is then replaced
        base = copy.deepcopy(model)
        if getattr(base, "frozen_storage", None):
            base.restore_frozen_weights()
        base = _plain_clip(base)
        layers = peft_layers(base)
        rank = min(v["rank"] for v in layers.values())
        scaling = next(iter(layers.values()))["scaling"]
        if not all(_same(v["scaling"], scaling) for v in layers.values()):
            raise ValueError("to_peft: the adapters have different scalings alpha / r; inject_lora gives one")
        unload_lora(base)
        names = sorted(layers)
        wider = {n: v["rank"] for n, v in layers.items() if v["rank"] != rank}
        config = peft.LoraConfig(
            r=rank, lora_alpha=scaling * rank, lora_dropout=0.0, bias="none",
            target_modules="^(" + "|".join(re.escape(n) for n in names) + ")$",
            rank_pattern={re.escape(n): r for n, r in wider.items()},
            alpha_pattern={re.escape(n): scaling * r for n, r in wider.items()})
        wrapped = peft.get_peft_model(base, config, adapter_name=adapter_name)
    inner = wrapped.base_model.model
    with torch.no_grad():
        for name, v in layers.items():
            peft_layer = inner.get_submodule(name)
            pairs = [(peft_layer, v["A"], v["B"])]
            if "out_A" in v:
                pairs.append((peft_layer.get_base_layer().out_proj, v["out_A"], v["out_B"]))
            for target, a, b in pairs:
                if target.r[adapter_name] != v["rank"] or not _same(target.scaling[adapter_name], scaling):
                    raise RuntimeError(f"to_peft: peft {peft.__version__} gave {name} rank {target.r[adapter_name]} "
                                       f"and scaling {target.scaling[adapter_name]}, not {v['rank']} and {scaling}")
                target.lora_A[adapter_name].weight.copy_(a)
                target.lora_B[adapter_name].weight.copy_(b)
    for module in wrapped.modules():  # peft's new layers in the mode of the layers they wrap (eval stays eval)
        if isinstance(module, peft_lora_layer.LoraLayer):
            module.train(module.get_base_layer().training)
    wrapped.training = wrapped.base_model.training = inner.training  # the wrappers' own flags, not recursive
    return wrapped.requires_grad_(False)


def check_adapter_directory(directory: Union[str, os.PathLike]) -> Path:
    """The directory a peft adapter is written to, checked before any work: a new or empty folder (not a
    symbolic link, not "." or "..") whose parent can be written (made when missing); else one error
    naming it and the fix."""
    if not os.fspath(directory).strip():
        raise ValueError("a peft adapter needs a directory path, e.g. adapter/; got an empty one")
    directory = Path(directory)
    if directory.name in ("", ".", ".."):
        raise FileExistsError(f"{os.fspath(directory)!r} names no new folder: a peft adapter is written into a new (or "
                              f"empty) directory; name one, e.g. {directory / 'adapter'}")
    if directory.is_symlink():
        raise FileExistsError(f"{directory} is a symbolic link: name a new directory, or the folder it points to")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"{directory} already exists{'' if directory.is_dir() else ' as a file'}: a peft adapter "
                              f"is written into a new (or empty) directory; pick another or remove it")
    reason = unwritable_dir_reason(directory.parent)
    if reason:
        raise PermissionError(f"cannot write {directory}: {reason}")
    return directory


def base_model_record(model: nn.Module) -> Optional[dict]:
    """What `BASE_MODEL_FILE` holds for a CLIPModel: its open_clip name, pretrained weights and config
    (None for a plain open_clip model, which names neither)."""
    if not (hasattr(model, "clip") and hasattr(model, "name") and hasattr(model, "pretrained")):
        return None
    import open_clip

    from ..version import __version__
    seed = getattr(model, "weights_seed", None)
    return {"format": "segpcl_fast.peft_adapter/1", "segpcl_fast_version": __version__, "model_name": model.name,
            "pretrained": model.pretrained, "model_config": open_clip.get_model_config(model.name),
            **({"weights_seed": seed} if seed is not None and model.pretrained is None else {}),
            "quick_gelu": bool(getattr(model, "quick_gelu", False)),
            "load_with": base_model_code(model.name, model.pretrained, seed, bool(getattr(model, "quick_gelu", False)))}


def base_model_code(name: str, pretrained: Optional[str], weights_seed: Optional[int] = None,
                    quick_gelu: bool = False) -> str:
    """The code that builds the open_clip model an adapter goes on: segpcl_fast.load_model(...).clip, also
    open_clip.create_model where open_clip resolves the name and weights on its own (with force_quick_gelu
    where the model runs QuickGELU and the name's config does not: OpenAI's weights under ViT-B-16); random weights
    (pretrained None) drawn after torch.manual_seed(weights_seed), as the run drew them (engine.trainer.
    build_model: the same tensors, bit for bit)."""
    seeded = pretrained is None and weights_seed is not None
    code = f"segpcl_fast.load_model({name!r}, pretrained={pretrained!r}).clip"
    if open_clip_resolves(name, pretrained):
        force = ", force_quick_gelu=True" if quick_gelu and not config_quick_gelu(name) else ""
        code += f", or open_clip.create_model({name!r}" + (f", pretrained={pretrained!r}" if pretrained else "") + force + ")"
    return (f"torch.manual_seed({weights_seed}) (the run's random base weights), then " if seeded else "") + code


def save_peft_adapter(model: nn.Module, directory: Union[str, os.PathLike], adapter_name: str = "default") -> Path:
    """Write the model's adapters as a peft adapter directory (peft's save_pretrained:
    adapter_config.json, adapter_model.safetensors; for a CLIPModel also BASE_MODEL_FILE, the open_clip
    model it goes on) at `directory`, a new or empty folder (its parents made when missing); it appears
    whole or not at all (written beside it, then renamed), and parents made for it go again on a failure."""
    directory = check_adapter_directory(directory)
    wrapped = to_peft(model, adapter_name)
    record = base_model_record(model)
    made = [p for p in (directory.parent, *directory.parent.parents) if not p.exists()]  # the nearest first
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        temp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
        try:
            try:
                wrapped.save_pretrained(str(temp), selected_adapters=[adapter_name])
            except Exception as e:  # safetensors' own error for a full disk or a file size limit: an OSError here
                if isinstance(e, OSError) or type(e).__name__ != "SafetensorError":
                    raise
                raise OSError(errno.EIO, f"peft could not write the adapter ({str(e).splitlines()[0][:200]}): the "
                                         f"disk may be full, or a file size limit reached") from e
            written = temp if adapter_name == "default" else temp / adapter_name  # peft nests named adapters
            if record is not None:
                (written / BASE_MODEL_FILE).write_text(json.dumps(record, indent=1) + "\n")
            chmod_tree_like_made(written)  # readable as any folder made here (mkdtemp's is private)
            if directory.is_dir():
                directory.rmdir()  # empty (checked above): os.replace needs the name free for a directory
            os.replace(written, directory)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
    except BaseException:
        for folder in made:  # only the folders this call made, and only while they are empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    return directory
