"""LoRA-B-only injection on both CLIP towers.

y = W x + b + (alpha / r) * B (A x): A (r x in) is random and frozen (Kaiming-uniform, as
peft/loralib initialise it), B (out x r) starts at zero and is the only trained parameter.
Every LoRA product goes through `ops.lora_b_linear`, which the C++/CUDA op replaces when built.

Targets: "q", "k", "v" (slices of open_clip's packed attention in_proj), "out" (attention
output projection), "c_fc", "c_proj" (MLP). Default: lora.targets in config.py (method.md's k, v,
c_fc, c_proj).

Towers: open_clip's own transformers (nn.MultiheadAttention blocks) and timm ViT-style image towers
(open_clip's TimmModel: SigLIP, EVA, PE), whose blocks name the same layers otherwise:
  q / k / v -> slices of attn.qkv (packed, rows [q; k; v]) or attn.q_proj / k_proj / v_proj
  out       -> attn.proj
  c_fc      -> mlp.fc1 (SwiGLU: both input projections, fc1_g and fc1_x)
  c_proj    -> mlp.fc2
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Iterable, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..config import ConfigError, LoRAConfig

_DEFAULTS = LoRAConfig()  # inject_lora's defaults are config.py's (method.md), not repeated here
VALID_TARGETS = ("q", "k", "v", "out", "c_fc", "c_proj")
VALID_TOWERS = ("visual", "text")


def _kaiming_uniform(rows: int, cols: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    a = torch.empty(rows, cols)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a


class LoRABLinear(nn.Module):
    """Replaces an nn.Linear: frozen W, b, A; trainable B. y = x W^T + b + (alpha / rank) (x A^T) B^T,
    through ops.lora_b_linear (the C++ op, the merged arrangement or the reference: README).

    A is drawn Kaiming-uniform as peft draws it, from `generator` (None: torch's global generator, as
    nn.Linear's own initialisation), B starts at zero (the layer equals `base` until B trains). A and B
    take the base weight's dtype (peft keeps adapters fp32 by default: wrap an fp32 base and train under
    autocast for that). Any nn.Linear: `LoRABLinear(nn.Linear(768, 3072), rank=32, alpha=32)`;
    inject_lora puts them in a CLIP."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: Optional[torch.Generator] = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRABLinear wraps an nn.Linear, got {type(base).__name__}")
        rank, scaling = lora_scaling("LoRABLinear", rank, alpha)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.scaling = rank, scaling
        self.register_buffer("lora_A", _kaiming_uniform(rank, base.in_features, generator).to(base.weight))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype,
                                               device=base.weight.device))
        self.train(base.training)  # in the mode of the layer it replaces (an eval model stays in eval)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.lora_b_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear with weight W + s B A (the same function, see merge_lora)."""
        w = self.weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                           dtype=w.dtype)
        linear.weight.copy_(merged_weight(w, self.lora_A, self.lora_B, self.scaling))
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear.requires_grad_(False).train(self.training)


def pack_slices(lora_B: Mapping[str, torch.Tensor], slices: list[str], d: int, rank: int) -> torch.Tensor:
    """B_full (3d x n*r) of a packed q/k/v projection: slice s's d rows hold [0 .. B_s .. 0], B_s in
    the r columns of its own A rows; an unadapted slice's rows are zero (in B's dtype: W's may be
    another, model/frozen_cast.py)."""
    n = len(slices)
    like = next(iter(lora_B.values()))
    rows = []
    for name in ("q", "k", "v"):
        if name in lora_B:
            j = slices.index(name)
            rows.append(F.pad(lora_B[name], (j * rank, (n - 1 - j) * rank)))
        else:
            rows.append(like.new_zeros(d, n * rank))
    return torch.cat(rows)


def lora_scaling(owner: str, rank, alpha) -> tuple[int, float]:
    """(rank, alpha / rank) after one check for every adapter and inject_lora: rank a positive integer, alpha
    a finite number > 0 (a NaN or inf alpha made the layer's output NaN while B was still 0)."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"{owner}: rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < math.inf:
        raise ValueError(f"{owner}: alpha must be a finite number > 0 (scaling alpha / rank), got {alpha!r}")
    return int(rank), float(alpha) / int(rank)


class LoRAPackedLinear(nn.Module):
    """Replaces a packed q/k/v nn.Linear (timm's attn.qkv, output rows [q; k; v]) with LoRA on the
    chosen slices, arranged as LoRAMultiheadAttention arranges open_clip's in_proj: one GEMM with
    A_cat (n*r x in) and B_full (3d x n*r, see pack_slices)."""

    def __init__(self, base: nn.Linear, slices: list[str], rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        if base.out_features % 3:
            raise ValueError(f"a packed q/k/v projection has 3 * d outputs, got {base.out_features}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.slices = [s for s in ("q", "k", "v") if s in slices]
        self.rank, self.scaling = lora_scaling("LoRAPackedLinear", rank, alpha)
        d = base.out_features // 3
        self.register_buffer("lora_A", torch.cat(
            [_kaiming_uniform(rank, base.in_features, generator) for _ in self.slices]).to(base.weight))
        self.lora_B = nn.ParameterDict({
            s: nn.Parameter(torch.zeros(d, rank, dtype=base.weight.dtype, device=base.weight.device))
            for s in self.slices})
        self.train(base.training)

    def packed_lora_B(self) -> torch.Tensor:
        return pack_slices(self.lora_B, self.slices, self.out_features // 3, self.rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.lora_b_linear(x, self.weight, self.bias, self.lora_A, self.packed_lora_B(), self.scaling)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, slices={self.slices}, rank={self.rank}, "
                f"scaling={self.scaling:g}")

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear with weight W + s B_full A_cat (see merge_lora)."""
        w = self.weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                           dtype=w.dtype)
        linear.weight.copy_(merged_weight(w, self.lora_A, self.packed_lora_B(), self.scaling))
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear.requires_grad_(False).train(self.training)


class LoRAMultiheadAttention(nn.Module):
    """Self-attention replacing nn.MultiheadAttention (batch_first) with LoRA on chosen q/k/v slices.

    The packed in_proj stays one GEMM: A_cat stacks the chosen slices' A matrices (n*r x d) and
    B_full (3d x n*r) places each trained B_s in its slice's rows and its own r columns (zeros
    elsewhere, not trained). With every B_s = 0 the output equals the plain in_proj exactly.
    """

    def __init__(self, mha: nn.MultiheadAttention, slices: list[str], out_lora: bool,
                 rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        check_attention(mha)
        d = mha.embed_dim
        self.embed_dim, self.num_heads = d, mha.num_heads
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.in_proj_weight.requires_grad_(False)
        if self.in_proj_bias is not None:
            self.in_proj_bias.requires_grad_(False)
        self.slices = [s for s in ("q", "k", "v") if s in slices]
        self.rank, self.scaling = lora_scaling("LoRAMultiheadAttention", rank, alpha)
        if self.slices:
            self.register_buffer("lora_A", torch.cat(
                [_kaiming_uniform(rank, d, generator) for _ in self.slices]).to(mha.in_proj_weight))
        self.lora_B = nn.ParameterDict({
            s: nn.Parameter(torch.zeros(d, rank, dtype=mha.in_proj_weight.dtype, device=mha.in_proj_weight.device))
            for s in self.slices})
        out = mha.out_proj
        for p in out.parameters():
            p.requires_grad_(False)
        self.out_proj = LoRABLinear(out, rank, alpha, generator) if out_lora else out
        self.train(mha.training)  # in the mode of the module it replaces (an eval model stays in eval)

    def packed_lora_B(self) -> torch.Tensor:
        """B_full (3d x n*r): slice s's rows hold [0 .. B_s .. 0] in its own r columns."""
        return pack_slices(self.lora_B, self.slices, self.embed_dim, self.rank)

    @torch.no_grad()
    def merged(self) -> nn.MultiheadAttention:
        """A plain nn.MultiheadAttention (batch_first, as open_clip builds it) whose packed in_proj
        weight is W + s B_full A_cat and whose out_proj is merged too (see merge_lora)."""
        w = self.in_proj_weight
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, bias=self.in_proj_bias is not None,
                                    batch_first=True, device=w.device, dtype=w.dtype)
        mha.in_proj_weight.copy_(merged_weight(w, self.lora_A, self.packed_lora_B(), self.scaling)
                                 if self.slices else w)
        if self.in_proj_bias is not None:
            mha.in_proj_bias.copy_(self.in_proj_bias)
        out = self.out_proj.merged() if isinstance(self.out_proj, LoRABLinear) else self.out_proj
        mha.out_proj.weight.copy_(out.weight)
        if out.bias is not None:
            mha.out_proj.bias.copy_(out.bias)
        return mha.requires_grad_(False).train(self.training)

    def forward(self, query, key=None, value=None, key_padding_mask: Optional[torch.Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        """nn.MultiheadAttention's forward (batch_first; its signature, positional order included): (output,
        weights). Self-attention (key and value None or `query` itself), or attention of `query`'s rows over
        the rows of one other tensor given as both key and value (nn.MultiheadAttention's packed in_proj split
        as [q; k, v]: model/vit_tail.py runs a ViT's last block for its class token so). key_padding_mask
        (B, S), bool (True: ignored) or additive, joins attn_mask. need_weights=True (torch's default) computes
        the attention explicitly and also returns its weights, averaged over heads unless average_attn_weights
        is False; open_clip passes need_weights=False, which runs ops.attention (SDPA or xformers) and returns
        None. is_causal is a hint that attn_mask is causal, as torch's: it needs attn_mask. A query whose keys are
        all masked gets NaN with the weights (as torch's MHA) and 0 through SDPA."""
        if is_causal and attn_mask is None:
            raise RuntimeError("LoRAMultiheadAttention: is_causal is a hint that attn_mask is the causal mask (as "
                               "nn.MultiheadAttention's): pass attn_mask too")
        kv = query if key is None else key
        if (value if value is not None else kv) is not kv:
            raise NotImplementedError("LoRAMultiheadAttention takes one tensor as both key and value")
        bsz, length, d = query.shape
        if kv is not query and (kv.dim() != 3 or kv.shape[0] != bsz or kv.shape[-1] != d):
            raise ValueError(f"LoRAMultiheadAttention: key / value {tuple(kv.shape)} do not fit query "
                             f"{tuple(query.shape)}: they take (batch {bsz}, any length, width {d})")
        if kv is query:
            q, k, v = self._project(query).chunk(3, dim=-1)
        else:
            q = self._project(query, "q")
            k, v = self._project(kv, "kv").chunk(2, dim=-1)
        h = self.num_heads
        q, k, v = (t.view(bsz, -1, h, d // h).transpose(1, 2) for t in (q, k, v))
        if attn_mask is not None:
            attn_mask = sdpa_mask(attn_mask, bsz, h, q.dtype)
        if key_padding_mask is not None:
            padding = sdpa_mask(key_padding_mask.reshape(bsz, 1, 1, -1), bsz, h, q.dtype)
            attn_mask = padding if attn_mask is None else attn_mask + padding
        weights = None
        if need_weights:  # softmax(q k^T / sqrt(D) + mask) v, written out: its weights are returned too
            wide = torch.promote_types(q.dtype, torch.float32)  # (bf16 / fp16 scores: in fp32, as SDPA's kernels)
            weights = torch.softmax(q.to(wide) @ k.to(wide).transpose(-2, -1) / math.sqrt(d // h)
                                    + (0.0 if attn_mask is None else attn_mask.to(wide)), dim=-1).to(q.dtype)
            out = weights @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            out = ops.attention(q, k, v, attn_mask)  # xformers when available (CUDA, no mask), else SDPA
        out = out.transpose(1, 2).reshape(bsz, length, d)
        return self.out_proj(out), weights

    def _project(self, x: torch.Tensor, part: str = "qkv") -> torch.Tensor:
        """x through `part` of the packed in_proj ("qkv": all 3d rows, "q": rows 0..d, "kv": d..3d),
        LoRA on the adapted slices among them (a part with none is a plain linear)."""
        d = self.embed_dim
        rows = {"q": slice(0, d), "kv": slice(d, 3 * d)}.get(part)  # None: the whole tensors, not views

        def take(t):
            return t if rows is None or t is None else t[rows]
        weight, bias = take(self.in_proj_weight), take(self.in_proj_bias)
        if not any(s in part for s in self.slices):
            return F.linear(x, weight, bias)
        return ops.lora_b_linear(x, weight, bias, self.lora_A, take(self.packed_lora_B()), self.scaling)


def sdpa_mask(attn_mask: torch.Tensor, bsz: int, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """nn.MultiheadAttention's attn_mask as the additive mask SDPA adds to (B, H, L, S) scores.

    A bool mask is True where attention is not allowed (MHA's convention; SDPA's bool is the
    opposite): it becomes -inf there and 0 elsewhere. A float mask is added as it is. A 3-D mask is
    per sample and head, (B * H, L, S) with sample b's heads at rows b*H .. b*H + H - 1 (open_clip's
    padding / CoCa class-token masks), viewed as (B, H, L, S); a 2-D (L, S) mask broadcasts."""
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill_(
            attn_mask, float("-inf"))
    else:
        attn_mask = attn_mask.to(dtype)
    if attn_mask.dim() == 3:
        if attn_mask.shape[0] != bsz * heads:
            raise ValueError(f"a 3-D attn_mask must be (batch * heads, L, S) = ({bsz * heads}, ...), got "
                             f"{tuple(attn_mask.shape)}")
        attn_mask = attn_mask.view(bsz, heads, *attn_mask.shape[1:])
    return attn_mask


def check_attention(mha: nn.MultiheadAttention) -> None:
    """What LoRAMultiheadAttention computes: open_clip's self-attention, batch_first, one width for q, k and v, and
    none of nn.MultiheadAttention's attention dropout, bias_k / bias_v (add_bias_kv) or zero key row
    (add_zero_attn), which it would drop without a word (B = 0 would no longer give the layer it replaced)."""
    if not mha.batch_first or not mha._qkv_same_embed_dim:
        raise ValueError("LoRA injection expects open_clip's batch_first self-attention blocks")
    unsupported = [option for option, used in (("dropout", mha.dropout != 0), ("add_bias_kv", mha.bias_k is not None),
                                               ("add_zero_attn", mha.add_zero_attn)) if used]
    if unsupported:
        raise ValueError(f"LoRA injection expects open_clip's self-attention blocks: this nn.MultiheadAttention uses "
                         f"{', '.join(unsupported)}, which LoRAMultiheadAttention does not compute")


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + s B A computed in fp32 or W's own dtype where wider (float64), rounded once to W's dtype."""
    wide = torch.promote_types(weight.dtype, torch.float32)
    return torch.addmm(weight.to(wide), lora_B.to(wide), lora_A.to(wide), alpha=scaling).to(weight.dtype)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its frozen weight, in place, and return the model (as peft's
    merge_and_unload does).

    Each LoRABLinear (and LoRAPackedLinear) becomes an nn.Linear with W + s B A and each LoRAMultiheadAttention the
    nn.MultiheadAttention it replaced, merged the same way, so the model is plain open_clip again:
    `model.clip.state_dict()` loads into `open_clip.create_model(name)` with strict=True and computes
    the same function up to the rounding of the merged weights to their dtype (W + s B A is
    computed in fp32, or float64 for a float64 model); in bf16 / fp16 that is the arrangement the run's own
    evaluation uses (ops: merged).
    Frozen weights stored in bf16 / fp16 for autocast (CLIPModel.store_frozen_weights) go back to fp32
    storage first, holding the rounded values the run computed with.
    A model without adapters is returned as it is.
    """
    return replace_adapters(model, lambda module: module.merged())


ADAPTER_TYPES = (LoRABLinear, LoRAPackedLinear, LoRAMultiheadAttention)


def outer_adapters(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every LoRA adapter not inside another (an attention's LoRA out_proj goes with it)."""
    adapted = [(name, m) for name, m in model.named_modules() if isinstance(m, ADAPTER_TYPES)]
    return [(name, m) for name, m in adapted if not any(name.startswith(other + ".") for other, _ in adapted)]


def replace_adapters(model: nn.Module, replacement) -> nn.Module:
    """Put `replacement(adapter)` in place of every outer adapter (merge_lora's merged layers, peft_adapter's
    plain ones), in place, and return the model. Frozen weights stored in bf16 / fp16 for autocast
    (CLIPModel.store_frozen_weights) go back to fp32 storage first. An adapter carrying a hook is refused, before
    anything changes: the hook would stay on the adapter taken out and never fire again."""
    adapters = outer_adapters(model)
    hooked = [name for name, m in adapters if _has_hooks(m)]
    if hooked:
        raise ValueError(f"{len(hooked)} LoRA adapter(s) to be replaced carry a hook (e.g. {hooked[0]}), which would "
                         "no longer fire: remove it (the handle register_*_hook returned) and register it again on "
                         "the plain layer in that place afterwards")
    if getattr(model, "frozen_storage", None):
        model.restore_frozen_weights()
    for name, module in adapters:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, replacement(module))
    return model


def _residual_blocks(tower: nn.Module) -> list[nn.Module]:
    """The residual attention blocks of a tower (modules holding .attn and .mlp.c_fc)."""
    blocks = [m for m in tower.modules()
              if isinstance(getattr(m, "attn", None), nn.MultiheadAttention) and hasattr(getattr(m, "mlp", None), "c_fc")]
    return blocks


def _is_linear(module: Optional[nn.Module]) -> bool:
    return isinstance(module, nn.Linear)


def _timm_blocks(tower: nn.Module) -> list[nn.Module]:
    """timm ViT-style blocks (timm's Block, EvaBlock): .attn with a Linear proj and a packed qkv or
    q_proj / k_proj / v_proj, .mlp with fc2 and fc1 (or SwiGLU's fc1_g, fc1_x). Attention pools
    (AttentionPoolLatent: q, kv, no .attn) are not blocks, as open_clip's attn_pool is not."""
    def attn_ok(a):
        return (a is not None and _is_linear(getattr(a, "proj", None))
                and (_is_linear(getattr(a, "qkv", None))
                     or all(_is_linear(getattr(a, f"{s}_proj", None)) for s in ("q", "k", "v"))))

    def mlp_ok(m):
        return (m is not None and _is_linear(getattr(m, "fc2", None))
                and (_is_linear(getattr(m, "fc1", None))
                     or (_is_linear(getattr(m, "fc1_g", None)) and _is_linear(getattr(m, "fc1_x", None)))))
    return [m for m in tower.modules() if attn_ok(getattr(m, "attn", None)) and mlp_ok(getattr(m, "mlp", None))]


# one replacement inject_lora makes: (parent module, attribute name, the new module from the A generator)
Replacement = tuple[nn.Module, str, Callable[[torch.Generator], nn.Module]]


def _timm_block_plan(block: nn.Module, targets: list[str], rank: int, alpha: float) -> list[Replacement]:
    """The replacements for a timm ViT / EVA block, in the order their A matrices are drawn."""
    attn, mlp = block.attn, block.mlp
    slices = [s for s in ("q", "k", "v") if s in targets]
    plan: list[Replacement] = []
    if slices and _is_linear(getattr(attn, "qkv", None)):
        separate_bias = getattr(attn, "q_bias", None) is not None and not getattr(attn, "qkv_bias_separate", True)
        if getattr(attn, "q_bias", None) is not None and not hasattr(attn, "qkv_bias_separate"):
            raise ValueError(f"{type(attn).__name__} of this timm version reads its fused qkv weight directly: LoRA "
                             f"on q/k/v cannot run there; upgrade timm, or use lora.targets without q, k, v")

        def packed_qkv(generator, attn=attn):
            if separate_bias:
                # EvaAttention with a fused qkv and separate q/k/v biases runs F.linear(x, self.qkv.weight, bias),
                # which never calls a wrapped qkv; its qkv_bias_separate mode calls self.qkv(x) and adds the bias
                # after (the same function, the bias added in another order)
                attn.qkv_bias_separate = True
            return LoRAPackedLinear(attn.qkv, slices, rank, alpha, generator)
        plan.append((attn, "qkv", packed_qkv))
    else:
        plan += [(attn, f"{s}_proj", None) for s in slices]
    if "out" in targets:
        plan.append((attn, "proj", None))
    if "c_fc" in targets:
        plan += [(mlp, name, None) for name in (("fc1",) if _is_linear(getattr(mlp, "fc1", None))
                                                 else ("fc1_g", "fc1_x"))]
    if "c_proj" in targets:
        plan.append((mlp, "fc2", None))
    return [_linear_replacement(parent, name, rank, alpha) if make is None else (parent, name, make)
            for parent, name, make in plan]


def _open_clip_block_plan(block: nn.Module, targets: list[str], rank: int, alpha: float) -> list[Replacement]:
    """The replacements for an open_clip ResidualAttentionBlock, in the order their A matrices are drawn."""
    slices = [t for t in ("q", "k", "v") if t in targets]
    plan: list[Replacement] = []
    if slices or "out" in targets:
        check_attention(block.attn)  # here, before inject_lora changes anything
        plan.append((block, "attn", lambda generator, mha=block.attn: LoRAMultiheadAttention(
            mha, slices, "out" in targets, rank, alpha, generator)))
    plan += [_linear_replacement(block.mlp, name, rank, alpha) for name in ("c_fc", "c_proj") if name in targets]
    return plan


def _linear_replacement(parent: nn.Module, name: str, rank: int, alpha: float) -> Replacement:
    return parent, name, lambda generator, base=getattr(parent, name): LoRABLinear(base, rank, alpha, generator)


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def inject_lora(model, rank: int = _DEFAULTS.rank, alpha: float = _DEFAULTS.alpha,
                targets: Iterable[str] = tuple(_DEFAULTS.targets), towers: Iterable[str] = tuple(_DEFAULTS.towers),
                seed: int = 0) -> list[nn.Parameter]:
    """Inject LoRA-B-only adapters into a CLIP in place; freeze everything else. The model is a
    segpcl_fast.model.CLIPModel (load_model) or a plain open_clip model (open_clip.create_model: CLIP,
    CustomTextCLIP; its image tower an open_clip or timm ViT).

    rank, alpha, targets and towers default to LoRAConfig's (config.py). seed draws the frozen A
    matrices; the trainer passes lora.init_seed (or run.seed when that is null).

    Returns the list of trainable B parameters.
    """
    # one name alone ("visual", "c_fc") is that one, not its letters
    targets, towers = ([x] if isinstance(x, str) else list(x) for x in (targets, towers))
    bad = [t for t in targets if t not in VALID_TARGETS]
    if bad:
        raise ValueError(f"unknown LoRA target(s) {bad}; choose from {VALID_TARGETS}")
    bad = [t for t in towers if t not in VALID_TOWERS]
    if bad:
        raise ValueError(f"unknown tower(s) {bad}; choose from {VALID_TOWERS}")
    if not targets or not towers:  # every weight would be frozen and nothing trained
        raise ValueError(f"inject_lora: no {'targets' if not targets else 'towers'} given: nothing would train; "
                         f"name some of {VALID_TARGETS if not targets else VALID_TOWERS}")
    lora_scaling("inject_lora", rank, alpha)
    if getattr(model, "frozen_storage", None):  # B and A would take W's (reduced) dtype
        raise ValueError(f"inject_lora: the model's frozen weights are already stored in {model.frozen_storage} "
                         "(store_frozen_weights); inject LoRA first, then store them")
    adapted = [name for name, m in model.named_modules() if isinstance(m, ADAPTER_TYPES)]
    if adapted:  # their blocks no longer look like plain blocks: a second pass would find none
        raise ValueError(f"inject_lora: the model already has {len(adapted)} LoRA layers (e.g. {adapted[0]}): inject "
                         "once; for another rank or other targets start from the model without them (merge_lora "
                         "folds them in)")
    visual, text = _towers(model)
    tower_modules = {"visual": visual, "text": text}
    plan: list[Replacement] = []  # every replacement, found (and checked) before anything changes
    for tower_name in towers:
        module = tower_modules[tower_name]
        if tower_name == "text":  # the text tower's blocks, not the image tower's inside a CLIP module
            module = getattr(module, "transformer", module)
        blocks = _residual_blocks(module)
        timm_blocks = [] if blocks else _timm_blocks(module)
        if not blocks and not timm_blocks:
            name = getattr(model, "name", type(model).__name__)
            raise ConfigError(f"the {tower_name} tower of {name} has no transformer blocks LoRA injection "
                              f"knows (open_clip's nn.MultiheadAttention blocks, timm's ViT / EVA blocks): pick a "
                              f"ViT model (model.name), or leave that tower out (lora.towers)")
        for block in timm_blocks:
            plan += _timm_block_plan(block, targets, rank, alpha)
        for block in blocks:
            plan += _open_clip_block_plan(block, targets, rank, alpha)
    # a hook on a replaced layer would stay on the old module and never fire again (peft keeps the layer as its
    # base_layer, whose hooks fire): refused, naming the layer, before anything changes
    replaced = {id(getattr(parent, name)) for parent, name, _ in plan}
    hooked = [name for name, m in model.named_modules() if id(m) in replaced and _has_hooks(m)]
    if hooked:
        raise ValueError(f"inject_lora: {len(hooked)} layer(s) it replaces with LoRA modules carry a hook (e.g. "
                         f"{hooked[0]}), which would no longer fire: call inject_lora first and register the hook "
                         "after it, on the LoRA module in that place")
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for parent, name, make in plan:
        setattr(parent, name, make(generator))
    return lora_parameters(model)


def _towers(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(image tower, module holding the text transformer) of a CLIPModel or a plain open_clip model."""
    if hasattr(model, "text_tower"):  # CLIPModel
        return model.visual, model.text_tower
    if isinstance(getattr(model, "visual", None), nn.Module) and (hasattr(model, "text") or hasattr(model, "transformer")):
        return model.visual, model.text if hasattr(model, "text") else model  # CustomTextCLIP: .text; CLIP: itself
    raise TypeError(f"inject_lora takes a CLIP: a segpcl_fast CLIPModel (segpcl_fast.load_model) or an open_clip model "
                    f"(open_clip.create_model), got {type(model).__name__}; for one nn.Linear use LoRABLinear(linear, "
                    "rank, alpha)")


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_B" in n]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors (A buffers and B parameters): the whole trained state of a run."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def load_lora_state_dict(model: nn.Module, lora: Mapping[str, torch.Tensor]) -> None:
    """Load a run's LoRA tensors, which must be exactly the model's: load_state_dict(strict=False)
    alone skips any whose names differ and leaves those B at zero without a word."""
    expected = {k for k in model.state_dict() if "lora_" in k}
    if set(lora) != expected:
        missing, extra = sorted(expected - set(lora)), sorted(set(lora) - expected)
        raise ValueError(f"its LoRA tensors do not fit the model its config builds (missing {len(missing)}: "
                         f"{missing[:3]}, unexpected {len(extra)}: {extra[:3]}; another open_clip version names "
                         f"the layers otherwise?)")
    model.load_state_dict(lora, strict=False)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
