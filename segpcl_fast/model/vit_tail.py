"""A ViT's last block for its class token alone: the rest of that block's output is never read.

open_clip's ViT pools r(x) = ln_post(x_L[:, 0]) (pool_type "tok", no attention pool), one row of the
last block's output. That row is

    h = ln_1(x)                                         all tokens: they are the keys and values
    y = x[:, :1] + ls_1(attn(query = h[:, :1], key = value = h))
    y = y + ls_2(mlp(ln_2(y)))

so the last block needs the key and value projections of every token, but the query projection, the
attention, the output projection and the MLP for the class token alone. Same products and sums for
the row that is read (the other rows are not computed); only GEMM shapes differ, so the rounding of
a sum may. For ViT-B/16 (197 tokens, width d) a block costs about 24 d^2 + 4 * 197 * d FLOPs a token
forward; the last block still computes 4 d^2 of it (keys and values) for the other 196 tokens and
skips the rest, 84 % of that block, 7 % of the tower's 12 blocks, forward and backward alike
(engine/flops.py counts it so), and none of the skipped rows' activations are kept for the backward.

`qualifies` says whether a tower's structure is the one above; `run_transformer` runs the tower's
transformer either way and, in eager calls, `ops.last_choice()["vit_last_block"]` says which ran
(calls inside torch.compile'd code are not recorded). SEGPCL_VIT_TAIL=full runs the whole last block
(for A/B timing). A hook (forward, pre-forward or backward) on the tower's transformer, on any
module of its last block or on ln_post keeps the whole block: the tail calls neither the transformer nor
that block, and calls the block's parts (and ln_post, through _pool) on one row, so those hooks would not
fire or would see one token. So does a forward replaced on the instance (a wrapper's `module.forward = ...`)
of the transformer, of the last block or any of its modules, or of ln_post: the tail would bypass it or
give it one token.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..ops.dispatch import env_choice, record_choice
from .lora import LoRAMultiheadAttention

CHOICES = ("cls", "full")


def choice() -> str:
    return env_choice("SEGPCL_VIT_TAIL", CHOICES, "cls")


def qualifies(visual: nn.Module) -> bool:
    """An open_clip VisionTransformer pooling its class token (pool_type "tok", no attention pool) whose
    last block is open_clip's own self-attention ResidualAttentionBlock (its attention nn.MultiheadAttention
    or our LoRAMultiheadAttention). Read at each call: LoRA injection replaces blocks' attention after load."""
    from open_clip.transformer import ResidualAttentionBlock, Transformer
    transformer = getattr(visual, "transformer", None)
    if (getattr(visual, "pool_type", None) != "tok" or getattr(visual, "attn_pool", None) is not None
            or type(transformer) is not Transformer or not getattr(transformer, "batch_first", True)
            or len(transformer.resblocks) == 0):
        return False
    last = transformer.resblocks[-1]
    ln_post = getattr(visual, "ln_post", None)
    # ln_post before the pool would see one row (after it, final_ln_after_pool, it sees the pooled row either way)
    row_wise = [ln_post] if isinstance(ln_post, nn.Module) and not getattr(visual, "final_ln_after_pool", False) else []
    return (type(last) is ResidualAttentionBlock and not hasattr(last, "ln_1_kv")
            and type(last.attn) in (nn.MultiheadAttention, LoRAMultiheadAttention)
            and not hooked(transformer) and "forward" not in transformer.__dict__
            and not any(hooked(m) or "forward" in m.__dict__ for m in [*last.modules(), *row_wise]))


def hooked(module: nn.Module) -> bool:
    """The module has hooks of its own, which expect module(x) to run on every token: forward hooks
    (the tail never calls the transformer or its last block, and calls the last block's parts on the
    class token's row alone) and backward hooks. (Global module hooks, such as FlopCounterMode's module
    tracker, fire on whichever modules run: they keep the tail.)"""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def applies(visual: nn.Module) -> bool:
    """Whether raw_features runs `visual`'s last block for the class token alone now."""
    return choice() == "cls" and qualifies(visual)


def class_token_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """block(x)[:, :1] of an open_clip ResidualAttentionBlock, computing the class token's row only."""
    h = block.ln_1(x)
    y = x[:, :1] + block.ls_1(block.attention(q_x=h[:, :1], k_x=h, v_x=h))
    return y + block.ls_2(block.mlp(block.ln_2(y)))


def run_transformer(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """visual.transformer(x) where `visual._pool` reads all of it; (N, 1, width), the class token's row
    of the last block, where the tower qualifies (module docstring). Either way `visual._pool` of the
    result gives the same pooled feature."""
    tail = applies(visual)
    if not torch.compiler.is_compiling():
        record_choice("vit_last_block", "cls" if tail else "full", x.device.type)
    if not tail:
        return visual.transformer(x)
    transformer = visual.transformer
    checkpointed = transformer.grad_checkpointing and not torch.jit.is_scripting()
    for block in transformer.resblocks[:-1]:  # as open_clip's Transformer.forward runs them
        x = checkpoint(block, x, None, None, None, use_reentrant=False) if checkpointed else block(x)
    last = transformer.resblocks[-1]
    return checkpoint(class_token_block, last, x, use_reentrant=False) if checkpointed else class_token_block(last, x)
