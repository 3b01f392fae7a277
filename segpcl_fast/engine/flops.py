"""Analytic FLOPs of one SeGP-CL training step (for MFU), read off the model's actual modules.

One step: the image tower on n_images task images + n_anchors anchors (one forward), the text
tower on the prompts of all needed classes (truncated at the longest end-of-text token), the loss
matmuls (L_cls over the current classes, L_ACGD over the old ones, L_GR on the kNN subgraphs),
and the backward pass for the LoRA B matrices only:

- a frozen linear costs 2·M·in·out forward and, when its input needs a gradient, the same again
  for dX (never dW). The first block of each tower gets an input that needs no gradient (frozen
  embeddings of images / tokens), so its in_proj has no dX.
- a LoRA path (in -> r -> out) costs 2·M·r·(in + out) forward; backward dB = 2·M·r·out, plus
  dU and dX through A (2·M·r·(out + in)) when the input needs a gradient.
- attention: 4·S·N²·d forward (QK^T, AV), 8·S·N²·d backward (no recomputation counted).
- a ViT whose last block runs for its class token alone (model/vit_tail.py): that block's keys and
  values on every token, its query, attention output, out_proj and MLP on one token a sequence.
- the patch embedding convolution runs forward only.

count="model" counts each LoRA slice's useful product; count="executed" counts what the packed
q/k/v implementation runs (its B_full holds zeros for slices without LoRA), which is what
torch.utils.flop_counter sees (tests check the two against each other).
Norms, softmax, GELU and other elementwise work are not counted (the MFU convention).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..model import vit_tail
from ..model.lora import LoRABLinear, LoRAMultiheadAttention


@dataclass
class StepShape:
    n_images: int  # task images in the batch
    n_anchors: int  # anchors in the same forward (0 at task 1)
    n_prompts: int  # prompts encoded (classes x templates)
    text_len: int  # truncated text length (longest end-of-text token + 1)
    n_cls_classes: int  # classes of L_cls (current task, or all seen)
    n_old: int  # old classes (ACGD logits)
    tsgr_pairs: int = 0  # roots x k of the TSGR subgraphs


def _linear_flops(module, rows: int, needs_dx: bool, count: str) -> tuple[int, int]:
    """(forward, backward) FLOPs of a frozen nn.Linear / LoRABLinear on `rows` rows."""
    fin, fout = module.in_features, module.out_features
    fwd = 2 * rows * fin * fout
    bwd = 2 * rows * fin * fout if needs_dx else 0
    if isinstance(module, LoRABLinear):
        r = module.rank
        fwd += 2 * rows * r * (fin + fout)
        bwd += 2 * rows * r * fout + (2 * rows * r * (fout + fin) if needs_dx else 0)
    return fwd, bwd


def _has_lora(module) -> bool:
    return isinstance(module, LoRABLinear) or (isinstance(module, LoRAMultiheadAttention) and bool(module.slices))


def _attention_flops(attn, seqs: int, tokens: int, needs_dx: bool, count: str,
                     queries: Optional[int] = None) -> tuple[int, int, bool]:
    """(forward, backward, output needs grad) of one self-attention on seqs x tokens, whose output is
    computed for `queries` rows a sequence (all tokens by default; 1 in a ViT's class-token last block,
    model/vit_tail.py: keys and values on every token, the query and everything after it on one)."""
    queries = tokens if queries is None else queries
    rows, q_rows = seqs * tokens, seqs * queries
    d = attn.embed_dim
    qkv_needs = needs_dx or _has_lora(attn)
    # the packed in_proj: one 3d-wide product on all rows, or q (d) on the query rows and k, v (2d) on all
    parts = [(rows, 3 * d, ("q", "k", "v"))] if queries == tokens else [(q_rows, d, ("q",)), (rows, 2 * d, ("k", "v"))]
    fwd = sum(2 * n * d * width for n, width, _ in parts) + 4 * seqs * queries * tokens * d
    bwd = sum(2 * n * d * width for n, width, _ in parts) if needs_dx else 0
    unit = 2 * seqs * queries * tokens * d  # one of the backward's four products: dV, dP, dQ, dK
    if queries == tokens or needs_dx:  # q, k, v one tensor (or all downstream of x): all four
        bwd += 4 * unit if qkv_needs else 0
    else:  # the class-token form with x needing no gradient: q and k, v need one each only with LoRA there
        slices = attn.slices if isinstance(attn, LoRAMultiheadAttention) else []
        gq, gkv = "q" in slices, "k" in slices or "v" in slices
        bwd += unit * (gkv + (gq or gkv) + gq + gkv)
    if isinstance(attn, LoRAMultiheadAttention) and attn.slices:
        r, n_r = attn.rank, len(attn.slices) * attn.rank
        for n, width, names in parts:
            if count == "executed":  # the packed B_full rows of this part (n*r wide, zeros included)
                if any(s in names for s in attn.slices):
                    fwd += 2 * n * d * n_r + 2 * n * n_r * width
                    bwd += 2 * n * width * n_r + (2 * n * n_r * (width + d) if needs_dx else 0)
            else:
                k = sum(s in names for s in attn.slices)
                fwd += k * 2 * n * r * (d + d)
                bwd += k * (2 * n * r * d + (2 * n * r * (d + d) if needs_dx else 0))
    o_fwd, o_bwd = _linear_flops(attn.out_proj, q_rows, qkv_needs, count)
    return fwd + o_fwd, bwd + o_bwd, qkv_needs or _has_lora(attn.out_proj)


def tower_flops(blocks, seqs: int, tokens: int, count: str = "model",
                last_queries: Optional[int] = None, input_needs_grad: bool = False) -> tuple[int, int, bool]:
    """(forward, backward, output needs grad) FLOPs of a stack of open_clip residual blocks on seqs x tokens; the last
    block's output computed for `last_queries` rows a sequence (all by default).

    Tracks which activations need a gradient: the first block's input does not (frozen
    embeddings) unless input_needs_grad (a gradient w.r.t. the images, as DPGD's); from the first LoRA on,
    everything downstream does.
    """
    fwd = bwd = 0
    needs = input_needs_grad
    blocks = list(blocks)
    for i, block in enumerate(blocks):
        queries = last_queries if i == len(blocks) - 1 else None
        rows = seqs * (tokens if queries is None else queries)
        a_fwd, a_bwd, attn_needs = _attention_flops(block.attn, seqs, tokens, needs, count, queries)
        needs = needs or attn_needs
        f_fwd, f_bwd = _linear_flops(block.mlp.c_fc, rows, needs, count)
        fc_needs = needs or _has_lora(block.mlp.c_fc)
        p_fwd, p_bwd = _linear_flops(block.mlp.c_proj, rows, fc_needs, count)
        needs = fc_needs or _has_lora(block.mlp.c_proj)
        fwd += a_fwd + f_fwd + p_fwd
        bwd += a_bwd + f_bwd + p_bwd
    return fwd, bwd, needs


def _proj_width(proj) -> tuple[int, int]:
    if isinstance(proj, torch.nn.Linear):
        return proj.in_features, proj.out_features
    return tuple(proj.shape)


def step_flops(model, shape: StepShape, count: str = "model") -> dict:
    """FLOPs of one training step: {"image", "text", "losses", "forward", "backward", "total"}."""
    if count not in ("model", "executed"):
        raise ValueError(f"count must be 'model' or 'executed', got '{count}'")
    visual = model.visual
    n_img = shape.n_images + shape.n_anchors
    conv = visual.conv1
    patches = (visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size) \
        // conv.kernel_size[0]
    tokens = patches * patches + 1
    last = 1 if vit_tail.applies(visual) else None  # the class token's row of the last block alone
    i_fwd, i_bwd, i_needs = tower_flops(visual.transformer.resblocks, n_img, tokens, count, last_queries=last)
    i_fwd += 2 * n_img * (tokens - 1) * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    d_v, e = _proj_width(visual.proj)
    i_fwd += 2 * n_img * d_v * e
    i_bwd += 2 * n_img * d_v * e if i_needs else 0
    text = model.text_tower
    t_fwd, t_bwd, t_needs = tower_flops(text.transformer.resblocks, shape.n_prompts, shape.text_len, count)
    d_t, e_t = _proj_width(text.text_projection)
    t_fwd += 2 * shape.n_prompts * d_t * e_t
    t_bwd += 2 * shape.n_prompts * d_t * e_t if t_needs else 0
    # logits: image . text, one backward product per operand that needs a gradient;
    # TSGR: one dot product per pair of student text embeddings (both operands are text)
    img_txt = 2 * e * (shape.n_images * shape.n_cls_classes + shape.n_anchors * shape.n_old)
    pairs = 2 * e * shape.tsgr_pairs
    l_fwd = img_txt + pairs
    l_bwd = img_txt * (int(i_needs) + int(t_needs)) + (2 * pairs if t_needs else 0)
    fwd, bwd = i_fwd + t_fwd + l_fwd, i_bwd + t_bwd + l_bwd
    return {"image": i_fwd + i_bwd, "text": t_fwd + t_bwd, "losses": l_fwd + l_bwd, "forward": fwd,
            "backward": bwd, "total": fwd + bwd}
