"""torch.compile of the student step (and, through the same bindings, of DPGD's teacher step).

What is compiled (run.compile=true): the two towers' heavy parts, bound on the model instance so
that every caller (Learner.loss, DPGD, evaluation, prototypes) runs them:

- image side: `CLIPModel.raw_features` (patch embedding + transformer + pooling): one graph per
  use (training step, B trainable; no-grad forwards; DPGD's grad w.r.t. the input only). B's
  requires_grad is in dynamo's guards, so every no-grad forward runs the model as stage 1's teacher
  does, under `frozen_eval` (B frozen, eval mode): evaluation, stage 3's prototypes and text cache,
  and the teacher share one no-grad graph per tower (with B trainable there they compiled two).
  The batch dimension changes between task 1 (images) and later tasks (images + anchors) and at
  the last batch of an epoch, so it is marked dynamic before each call (dynamic_batch): each use
  compiles one symbolic graph. Left to dynamo's automatic dynamic shapes (SEGPCL_COMPILE_DYNAMIC_BATCH=0)
  a use compiled a static graph first and a symbolic one at its first other batch size, which then
  ran every later step: a training run's steps ran the static graph only until the first epoch's
  last short batch, and a benchmark of steps of one batch size timed a graph training hardly runs.
  The tiny default run compiles 3 image and 2 text graphs, all in tasks 1 and 2 (TORCH_LOGS=recompiles
  shows each guard).
- loss terms: stage 2's math on the towers' outputs (method/losses.py: training_losses, bound as
  Learner.loss_terms by `compile_learner`): the normalisations, the logit GEMMs, cross-entropy and the
  anchor_kl / knn_subgraph_kl custom ops, forward and backward, as one graph instead of about a
  hundred eager launches a step (an H200 trace put the step's eager ops at about 12 ms of host time,
  BENCHMARKS.md session 42). dynamic=True, duck sizing off (_without_duck_sizing): one graph without
  ACGD and TSGR (task 1), one with them. SEGPCL_COMPILE_LOSS=0 leaves them eager.
- text side: `CLIPModel.text_features`, everything from the prompts' tokens (cut at the longest
  end-of-text token by CLIPModel.prompt_tokens, once, on the CPU tokens: no host sync) to their
  L2-normalised embeddings: token and positional embedding, the transformer, ln_final, the end-of-text
  gather, the projection and the normalisation, forward and backward, as one graph (until session 43
  only the transformer was compiled, and the rest ran as about twenty eager launches a step, half of
  them in backward). dynamic=True from the start, duck sizing off: both the class count (grows every
  task) and the truncated length (the longest prompt's end-of-text token among the classes seen so
  far) change per task, so a static graph would recompile every task. A text tower the truncation
  does not apply to (CLIPModel.truncates_text: a class token, a padding mask, another pooling) runs
  open_clip's encode_text, and only its transformer trunk is compiled, as before.

The compiled functions are bound with types.MethodType on the instance, so stage 1's teacher (the
model itself under `frozen_eval`: eval mode, requires_grad off, both restored after) runs them
too. Inside compiled graphs LoRA linears run the
merged arrangement in plain PyTorch (ops.lora_linear.lora_b_linear_merged, an autograd.Function of
aten ops that inductor traces and fuses around; SEGPCL_LORA_COMPILE=cpp puts the C++ op
`torch.ops.segpcl.lora_b_linear_fwd`, with its fake kernel, there instead), and the Triton ops are
torch.library custom ops with fake kernels, so dynamo sees through them without graph breaks.

LoRA merges: the merged arrangement forms W + s B A for every LoRA layer once a step. Inside compiled
graphs (ops.lora_linear.merged_weight) it is an mm of parameters that inductor's batch_linear_post_grad
pass batches into one bmm per layer shape and tower (6 for ViT-B/16's two towers instead of 72 GEMMs,
each of which, as addmm on CUDA, also copied W and set a memset: session 35's H200 trace, BENCHMARKS.md
session 43). SEGPCL_COMPILE_BATCH_MERGE=0 keeps one addmm a layer.

SEGPCL_COMPILE_CPP_WRAPPER=1 has inductor write each graph's host code (kernel launches, GEMM calls,
buffer allocations) as C++ it compiles, instead of Python: the H200 profile found the compiled step's
forwards launch-bound, at about 40-50 us of host time a kernel. Off by default: every graph's compile
then includes a C++ build, and its gain is not measured on a GPU yet.

Under the CUDA-graph modes (reduce-overhead, max-autotune) inductor may still run a graph without
CUDA graphs (mutated inputs, CPU tensors, an op it cannot capture); it says so only to a log that
is off by default. The towers then log a warning with inductor's reason, and `cudagraph_skips()`
counts such graphs (the e2e benchmark records it for its CUDA-graph variants).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import types
from dataclasses import dataclass
from typing import Optional

import torch

from ..ops.lora_linear import batch_merge
from ..ops.lora_linear import compiled_impl as compiled_lora_impl

log = logging.getLogger("segpcl_fast.engine")

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class CompileSettings:
    mode: str = "default"  # torch.compile mode; "max-autotune-no-cudagraphs" is the GPU preset's choice
    backend: str = "inductor"  # "aot_eager" (tests: same graphs, no code generation) or "eager"
    dynamic_text: bool = True  # text tower symbolic in class count and length from the start
    # image tower symbolic in the batch from the start (SEGPCL_COMPILE_DYNAMIC_BATCH=0: torch's automatic
    # dynamic shapes, a static graph first); see the module docstring
    dynamic_batch: bool = True
    # Learner.loss_terms (stage 2's math on the towers' outputs) compiled too (SEGPCL_COMPILE_LOSS=0: eager)
    loss: bool = True
    # inductor's C++ wrapper (SEGPCL_COMPILE_CPP_WRAPPER=1; backend inductor only): each graph's host code,
    # which launches its kernels and GEMMs and allocates their buffers, compiled C++ instead of generated
    # Python. The H200 profile had the compiled step launch-bound, about 40-50 us of host time a kernel.
    # Longer compiles (a C++ build per graph); the same kernels, so the same values (tested on the CPU).
    cpp_wrapper: bool = False
    # (the LoRA merges batched into one bmm per layer shape: SEGPCL_COMPILE_BATCH_MERGE, read by
    # ops.lora_linear.batch_merge alone, since merged_weight reads it while tracing; see inductor_options)

    @classmethod
    def from_env(cls) -> "CompileSettings":
        """Defaults, overridden by SEGPCL_COMPILE_MODE and SEGPCL_COMPILE_BACKEND (hardware presets set these)."""
        s = cls()
        # unset or empty: the default, as for SEGPCL_OPS and the other switches (an empty one was "compile mode ''")
        s.mode = os.environ.get("SEGPCL_COMPILE_MODE") or s.mode
        s.backend = os.environ.get("SEGPCL_COMPILE_BACKEND") or s.backend
        if s.mode not in MODES:  # named by its variable: a run's config has no key for it
            raise ValueError(f"SEGPCL_COMPILE_MODE: compile mode '{s.mode}' is unknown; choose one of {MODES}, "
                             "or unset it")
        backends = torch.compiler.list_backends(exclude_tags=())  # torch's, and those a plugin registered
        if s.backend not in backends:  # torch.compile refused it only when the towers compiled, after the loads
            raise ValueError(f"SEGPCL_COMPILE_BACKEND: torch.compile backend '{s.backend}' is unknown; choose one of "
                             f"{', '.join(b for b in ('inductor', 'aot_eager', 'eager', 'cudagraphs') if b in backends)}"
                             f" (torch.compiler.list_backends() lists all), or unset it")
        s.dynamic_batch = _env_flag("SEGPCL_COMPILE_DYNAMIC_BATCH", "the image batch symbolic from the start",
                                    "torch's automatic dynamic shapes")
        s.loss = _env_flag("SEGPCL_COMPILE_LOSS", "stage 2's loss terms compiled", "eager")
        s.cpp_wrapper = _env_flag("SEGPCL_COMPILE_CPP_WRAPPER", "inductor's C++ wrapper", "its Python wrapper",
                                  default="0")
        s.options()  # validate now: one clear error before the run starts
        return s

    def options(self) -> dict:
        if self.mode not in MODES:
            raise ValueError(f"compile mode '{self.mode}' is unknown; choose one of {MODES}")
        # read again while tracing; checked here, in eager code, because dynamo (seen on torch 2.6)
        # may replace an error raised during tracing with "Observed exception", dropping its message
        compiled_lora_impl()
        batch_merge()
        kwargs = {"backend": self.backend}
        if self.backend == "inductor" and self.cpp_wrapper and self.mode in CUDA_GRAPH_MODES:
            # torch 2.11's inductor turns CUDA graphs off under its C++ wrapper; 2.14's, with graph partition
            # (its default) on: the mode would run as plain compiled graphs, which its name does not say
            raise ValueError(f"SEGPCL_COMPILE_CPP_WRAPPER=1 with compile mode '{self.mode}': inductor's C++ wrapper "
                             f"runs without CUDA graphs, which this mode is for; use one or the other "
                             f"(SEGPCL_COMPILE_CPP_WRAPPER=0, or mode default / max-autotune-no-cudagraphs)")
        extra = self.inductor_options() if self.backend == "inductor" else {}
        if extra:
            # torch.compile takes a mode or options, not both: the mode's own options, plus ours
            from torch._inductor import list_mode_options
            kwargs["options"] = {**list_mode_options(self.mode), **extra}
        elif self.backend == "inductor":
            kwargs["mode"] = self.mode
        return kwargs

    def inductor_options(self) -> dict:
        """The inductor options these settings add to the mode's own."""
        extra = {}
        if self.cpp_wrapper:
            extra["cpp_wrapper"] = True
        if batch_merge() and self.dynamic_batch:
            # batch the LoRA merges (ops.lora_linear.merged_weight: B A as an mm of parameters alone) of one
            # shape into one bmm. The pass batches any independent mm of equal static shapes; with the
            # image batch, the prompts and the positions symbolic, only products of parameters have them.
            # (A static batch would give the layers' g^T u static shapes too, and stacking those copies
            # activations: not with SEGPCL_COMPILE_DYNAMIC_BATCH=0.) Search depth 6 reaches the merges
            # saved for the backward from the forward graph's output; deeper costs compile time (100:
            # +80 s for ViT-B/16 on a CPU) for no more merges batched.
            extra["post_grad_fusion_options"] = {"batch_linear_post_grad": {
                "min_fuse_set_size": 2, "max_fuse_search_depth": 6}}
        return extra


def _env_flag(name: str, on: str, off: str, default: str = "1") -> bool:
    """A 0 / 1 switch, or one ValueError naming it and what each value does (`on`: 1, `off`: 0)."""
    flag = os.environ.get(name, default)
    if flag not in ("0", "1"):
        on, off = (f"{on}, the default", off) if default == "1" else (on, f"{off}, the default")
        raise ValueError(f"{name}={flag!r}: use 1 ({on}) or 0 ({off})")
    return flag == "1"


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # inductor replays these as CUDA graphs


# inductor logs each graph its CUDA-graph modes run without CUDA graphs ("skipping cudagraphs due to
# mutated inputs", "... cpu device", "... non-cudagraphable ops") to this artifact logger, whose records
# do not reach the root logger unless TORCH_LOGS names it, and counts them in counters["inductor"]
CUDAGRAPH_LOGGER = "torch._inductor.cudagraph_utils.__cudagraphs"
# torch 2.6 logs the same messages to its perf-hints logger instead: the reasons are read from both
CUDAGRAPH_LOGGERS = (CUDAGRAPH_LOGGER, "torch._inductor.cudagraph_utils.__perf_hints")


class _SkipReasons(logging.Handler):
    """Keeps the last `keep` "skipping cudagraphs" messages of inductor's cudagraphs logger."""

    def __init__(self, keep: int = 32):
        super().__init__(level=logging.WARNING)
        self.reasons: list[str] = []
        self.keep = keep

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "cudagraph" in message:
            self.reasons = (self.reasons + [message])[-self.keep:]


def cudagraph_skip_count() -> int:
    """Graphs torch.compile's CUDA-graph modes have run without CUDA graphs in this process (inductor's count)."""
    from torch._dynamo.utils import counters
    return int(counters["inductor"]["cudagraph_skips"])


@contextlib.contextmanager
def cudagraph_skips():
    """Yields a dict that on exit holds how many compiled graphs inside the block were run without CUDA
    graphs under a CUDA-graph mode ("count") and inductor's reasons ("reasons": those it logged; a graph
    on the CPU is counted but not logged). The e2e benchmark records it: a CUDA-graph variant whose
    graphs were all skipped would time the plain compiled step again without a word."""
    handler = _SkipReasons()
    for name in CUDAGRAPH_LOGGERS:
        logging.getLogger(name).addHandler(handler)
    found = {"count": cudagraph_skip_count(), "reasons": []}
    try:
        yield found
    finally:
        for name in CUDAGRAPH_LOGGERS:
            logging.getLogger(name).removeHandler(handler)
        found["count"] = cudagraph_skip_count() - found["count"]
        found["reasons"] = list(handler.reasons)


_skip_log: Optional[_SkipReasons] = None  # installed on the cudagraphs logger by the first _warning_on_skips
_skips_reported = 0  # inductor's skip count when the towers last warned


def _warning_on_skips(fn, mode: str, what: str):
    """Under a CUDA-graph mode: after a call of `fn` (a compiled tower), log a warning with inductor's
    reasons if graphs have run without CUDA graphs since the last warning: the tower's own, compiled in
    this call (once per graph: a new shape or grad mode compiles a new one), or a backward graph whose
    skip inductor found while the backward ran. Costs one counter read a call."""
    global _skip_log, _skips_reported
    if _skip_log is None:
        _skip_log = _SkipReasons()
        for name in CUDAGRAPH_LOGGERS:
            logging.getLogger(name).addHandler(_skip_log)
        _skips_reported = cudagraph_skip_count()
    handler = _skip_log

    @functools.wraps(fn)
    def run(*args, **kwargs):
        global _skips_reported
        out = fn(*args, **kwargs)
        count = cudagraph_skip_count()
        if count > _skips_reported:
            new, _skips_reported = count - _skips_reported, count
            reasons = "; ".join(handler.reasons[-new:]) or "no reason logged (a CPU graph?)"
            log.warning("torch.compile mode '%s': %d compiled graph(s) ran without CUDA graphs, seen after %s "
                        "(%s); they still run, compiled, with a launch per kernel", mode, new, what, reasons)
        return out
    return run


def _cloning_outputs(fn):
    """A CUDA-graph replay writes its outputs into the graph's own memory pool, and the next replay of
    that graph overwrites them (cudagraph trees then refuse any access to the old ones). The trainer
    keeps outputs across calls (prototypes: a list of r(x) per batch, which .float() of an fp32 r(x)
    does not copy), so under these modes each compiled tower's output is cloned, outside the graph:
    N x width for the image tower, C x d for the text tower (C x L x width for a trunk compiled alone),
    small beside the towers' work; the loss terms' (total, {term: value}) too (the step's outcome keeps
    them past the next replay)."""
    from torch.utils._pytree import tree_map

    @functools.wraps(fn)
    def run(*args, **kwargs):
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, fn(*args, **kwargs))
    return run


def _batch_marked_dynamic(fn):
    """Marks the images' batch dimension dynamic before each call of the compiled image tower, so its
    first graph of a use is already the symbolic one (maybe_mark_dynamic: a batch of 1, which dynamo
    specialises, gets a graph of its own instead of an error). Left to torch's automatic dynamic shapes,
    the tower compiled a static graph first and a symbolic one at the first other batch size: a training
    run's last short batch of task 1's first epoch, after which the symbolic graph ran every step."""
    @functools.wraps(fn)
    def run(self, images, *args, **kwargs):
        torch._dynamo.maybe_mark_dynamic(images, 0)
        return fn(self, images, *args, **kwargs)
    return run


# (function, structure) -> that function with a code object of its own (_code_for)
_CODE_COPIES: dict = {}


def _structure(module: torch.nn.Module, *extra) -> tuple:
    """What dynamo guards a module's compiled graphs on that differs between models of one
    architecture: every parameter's and buffer's name, shape, dtype, device and requires_grad."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return (*extra, *((n, tuple(t.shape), t.dtype, t.device, t.requires_grad) for n, t in tensors))


def _code_for(fn, module: torch.nn.Module, *extra):
    """`fn` (a plain function) as a function with a code object of its own per module structure.
    Dynamo keeps compiled graphs per code object and counts them against its recompile limit (8 by
    default) there. Compiling `CLIPModel.raw_features` itself, every model compiled in a process would
    add its graphs to one list: a sweep over lora.rank or lora.targets (about 3 image and 2 text graphs
    each) would have dynamo give up from the second structure on and run the towers eager, with a
    warning. Models of one structure (seeds, ablation variants, evaluate after train) share a copy, so
    they reuse each other's graphs as before."""
    key = (fn, _structure(module, *extra))
    if key not in _CODE_COPIES:
        own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                                 fn.__closure__)
        own.__kwdefaults__, own.__qualname__, own.__doc__ = fn.__kwdefaults__, fn.__qualname__, fn.__doc__
        own.__dict__.update(fn.__dict__)
        _CODE_COPIES[key] = own
    return _CODE_COPIES[key]


def compile_model(model, settings: Optional[CompileSettings] = None) -> dict:
    """Bind compiled raw_features and text_features (or, for a tower run whole, its trunk's forward) on
    `model` (a CLIPModel), in place.

    Hooks registered on the towers' modules after this are not seen by the compiled graphs (dynamo's
    default, torch._dynamo.config.skip_nnmodule_hook_guards): register them first, or uncompile_model.

    Returns {"image": ..., "text": ...} naming what was compiled. Idempotent.
    """
    settings = settings or CompileSettings()
    opts = settings.options()
    mode = settings.mode if settings.backend == "inductor" else None

    def wrap(fn, what):
        if mode not in CUDA_GRAPH_MODES:
            return fn
        return _warning_on_skips(_cloning_outputs(fn), mode, what)
    done = {}
    if "raw_features" not in model.__dict__:
        fn = torch.compile(_code_for(type(model).raw_features, model.visual, model.image_autocast), dynamic=None,
                           **opts)
        if settings.dynamic_batch:
            fn = _batch_marked_dynamic(fn)
        model.raw_features = types.MethodType(wrap(fn, "the image tower"), model)
    done["image"] = "CLIPModel.raw_features"
    dynamic_text = True if settings.dynamic_text else None
    trunk = getattr(model.text_tower, "transformer", None)
    if model.truncates_text:  # tokens to embeddings, one graph (CLIPModel.text_features)
        if "text_features" not in model.__dict__:
            fn = torch.compile(_code_for(type(model).text_features, model.text_tower, model.text_autocast),
                               dynamic=dynamic_text, **opts)
            fn = _without_duck_sizing(fn)  # prompts and positions: two sizes, equal or not
            model.text_features = types.MethodType(wrap(fn, "the text tower"), model)
        done["text"] = "CLIPModel.text_features"
    elif isinstance(trunk, torch.nn.Module):  # a tower run whole (open_clip's encode_text): its trunk
        if "forward" not in trunk.__dict__:
            fn = torch.compile(_code_for(type(trunk).forward, trunk, model.text_autocast), dynamic=dynamic_text,
                               **opts)
            trunk.forward = types.MethodType(wrap(fn, "the text trunk"), trunk)
        done["text"] = f"{type(trunk).__name__}.forward (text trunk)"
    log.info("torch.compile (%s): %s", opts, done)
    return done


def compile_learner(learner, settings: Optional[CompileSettings] = None) -> dict:
    """compile_model(learner.model) and, with settings.loss, stage 2's loss terms
    (Learner.loss_terms: the normalisations, the two logit GEMMs, cross-entropy, anchor_kl and
    knn_subgraph_kl, forward and backward), which ran as about a hundred eager launches a step
    between and after the towers' graphs (BENCHMARKS.md, session 42). Compiled with dynamic=True:
    the batch, the anchors and the class counts change between tasks and at an epoch's last batch.
    One code copy per model structure and loss settings (_code_for). Idempotent."""
    from ..method.losses import training_losses
    settings = settings or CompileSettings()
    done = compile_model(learner.model, settings)
    if settings.loss and not loss_terms_compiled(learner):
        opts = settings.options()
        cfg = learner.cfg
        constants = (cfg.optim.cls_over, cfg.acgd.tau, cfg.acgd.weight, cfg.tsgr.weight)
        fn = _without_duck_sizing(torch.compile(_code_for(training_losses, learner.model, *constants), dynamic=True,
                                                **opts))
        mode = settings.mode if settings.backend == "inductor" else None
        if mode in CUDA_GRAPH_MODES:  # a replay overwrites the outputs the step's outcome keeps
            fn = _warning_on_skips(_cloning_outputs(fn), mode, "the loss terms")
        fn._segpcl_compiled = True
        learner.loss_terms = fn
    if loss_terms_compiled(learner):
        done["loss"] = "Learner.loss_terms (method/losses.py: training_losses)"
    return done


def _without_duck_sizing(fn):
    """Trace `fn` with duck sizing off: sizes equal at the first trace are otherwise one symbol, and a
    later task where they differ compiles again. The loss terms met it at task 2 of an even split, where
    the new classes (the TSGR roots) are as many as the old ones, and recompiled at task 3 (inside the
    profiler's window, which starts at task 3). Read while tracing only; a call costs a config patch."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            return fn(*args, **kwargs)
    return run


def loss_terms_compiled(learner) -> bool:
    """Whether compile_learner bound compiled loss terms on `learner`."""
    return getattr(learner.loss_terms, "_segpcl_compiled", False)


def is_compiled(model) -> bool:
    return "raw_features" in model.__dict__


def uncompile_model(model) -> None:
    """Drop the compiled bindings (back to the class methods)."""
    model.__dict__.pop("raw_features", None)
    model.__dict__.pop("text_features", None)
    trunk = getattr(model.text_tower, "transformer", None)
    if isinstance(trunk, torch.nn.Module):
        trunk.__dict__.pop("forward", None)


def compile_counters() -> dict:
    """Dynamo's counters: graphs compiled (a recompile is one more graph), graph breaks (by reason).
    Dynamo keeps no recompile count of its own (TORCH_LOGS=recompiles prints each one and its guard)."""
    from torch._dynamo.utils import counters
    return {"unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": dict(counters["graph_break"]),
            "frames_ok": int(counters["frames"].get("ok", 0))}
