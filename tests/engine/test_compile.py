"""torch.compile of the training step: no graph breaks, bounded recompiles across tasks, same numbers."""
import copy

import pytest
import torch
from run_cases import first_token_model_name

from segpcl_fast.api import make_config
from segpcl_fast.engine import compiling
from segpcl_fast.engine.trainer import Trainer
from segpcl_fast.model.clip import load_model
from segpcl_fast.model.lora import inject_lora

AOT = compiling.CompileSettings(backend="aot_eager")  # same dynamo graphs as inductor, no code generation


def _config(model_name, out, **kw):
    base = dict(model__name=model_name, model__pretrained=None, max_train_per_class=2, max_test_per_class=1,
                num_tasks=3, task_sizes=[34, 33, 33], epochs=1, optim__batch_size=16, dpgd__k_adv=2, dpgd__k_seed=1, output_dir=str(out),
                progress=False, plots=False, checkpoint=False, num_threads=1, train_augment=False,
                run__device="cpu", fwt=False)
    base.update(kw)
    return make_config(**base)


def _lora(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_B" in k}


@pytest.mark.slow
def test_compiled_run_has_no_graph_breaks_and_bounded_recompiles(tiny_model_name, tmp_path):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # process-wide: count only this run's graphs
    trainer = Trainer(_config(tiny_model_name, tmp_path / "c", compile=True), compile_settings=AOT)
    assert set(trainer.compiled) == {"image", "text", "loss"}
    graphs_after = []
    original = trainer.train_task

    def train_task(t):
        info = original(t)
        graphs_after.append(compiling.compile_counters()["unique_graphs"])
        return info
    trainer.train_task = train_task
    result = trainer.run()
    stats = compiling.compile_counters()
    assert stats["graph_breaks"] == {}, stats["graph_breaks"]
    # the class count grows (3 tasks) and the text length changes, yet task 3 compiles nothing new:
    # text trunk dynamic from the start, image batch dynamic after its first change
    assert graphs_after[2] == graphs_after[1], graphs_after
    # one graph per use: image: the step, DPGD's input gradient, no grad; text: the step, no grad. The
    # no-grad forwards (teacher, evaluation, stage 3) run with B frozen, so they share one graph per
    # tower (B's requires_grad is guarded: with it trainable there they made 2 more), and the image batch
    # is symbolic from the start (torch's automatic dynamic shapes compiled a static graph first: 1 more)
    assert stats["unique_graphs"] == 5 + 2, stats  # and the loss terms: task 1's, later tasks' (ACGD, TSGR)
    eager = Trainer(_config(tiny_model_name, tmp_path / "e"))
    expected = eager.run()
    assert result.accuracy_matrix == expected.accuracy_matrix
    for k, v in _lora(eager.model).items():
        torch.testing.assert_close(_lora(trainer.model)[k], v, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("flag, graphs", [("1", [1, 0, 0]), ("0", [1, 1, 0])])
def test_the_image_batch_is_symbolic_from_the_first_call(tiny_model_name, monkeypatch, flag, graphs):
    """A training run's batches are full ones and a last short one per epoch. With the batch marked
    dynamic (the default) the first graph already serves both; SEGPCL_COMPILE_DYNAMIC_BATCH=0 leaves it
    to torch: a static graph first, then a symbolic one at the first other size. Same values."""
    torch._dynamo.reset()
    monkeypatch.setenv("SEGPCL_COMPILE_DYNAMIC_BATCH", flag)
    monkeypatch.setenv("SEGPCL_COMPILE_BACKEND", "aot_eager")
    model = load_model(tiny_model_name, pretrained=None)
    inject_lora(model, rank=4, alpha=4.0)
    eager = copy.deepcopy(model)
    compiling.compile_model(model, compiling.CompileSettings.from_env())
    new_graphs = []
    for n in (8, 3, 8):
        x = torch.randn(n, 3, 32, 32)
        before = compiling.compile_counters()["unique_graphs"]
        out = model.raw_features(x)
        new_graphs.append(compiling.compile_counters()["unique_graphs"] - before)
        torch.testing.assert_close(out, eager.raw_features(x))
    assert new_graphs == graphs


def test_a_bad_dynamic_batch_setting_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("SEGPCL_COMPILE_DYNAMIC_BATCH", "yes")
    with pytest.raises(ValueError, match=r"SEGPCL_COMPILE_DYNAMIC_BATCH='yes': use 1 .* or 0"):
        compiling.CompileSettings.from_env()
    monkeypatch.setenv("SEGPCL_COMPILE_DYNAMIC_BATCH", "1")
    monkeypatch.setenv("SEGPCL_COMPILE_LOSS", "on")
    with pytest.raises(ValueError, match=r"SEGPCL_COMPILE_LOSS='on': use 1 .* or 0"):
        compiling.CompileSettings.from_env()
    monkeypatch.setenv("SEGPCL_COMPILE_LOSS", "0")
    assert compiling.CompileSettings.from_env().loss is False
    assert compiling.CompileSettings.from_env().cpp_wrapper is False  # off unless asked for
    monkeypatch.setenv("SEGPCL_COMPILE_CPP_WRAPPER", "yes")
    with pytest.raises(ValueError, match=r"SEGPCL_COMPILE_CPP_WRAPPER='yes': use 1 \(inductor's C\+\+ wrapper\) "
                                         r"or 0 \(its Python wrapper, the default\)"):
        compiling.CompileSettings.from_env()
    monkeypatch.setenv("SEGPCL_COMPILE_CPP_WRAPPER", "1")
    assert compiling.CompileSettings.from_env().cpp_wrapper is True
    monkeypatch.setenv("SEGPCL_COMPILE_BATCH_MERGE", "yes")  # read by ops.lora_linear.batch_merge, checked up front
    with pytest.raises(ValueError, match=r"SEGPCL_COMPILE_BATCH_MERGE='yes' is unknown; choose one of \('1', '0'\)"):
        compiling.CompileSettings.from_env()


def test_loss_terms_stay_eager_with_SEGPCL_COMPILE_LOSS_0(tiny_model_name, tmp_path, monkeypatch):
    from segpcl_fast.method import losses
    monkeypatch.setenv("SEGPCL_COMPILE_LOSS", "0")
    monkeypatch.setenv("SEGPCL_COMPILE_BACKEND", "aot_eager")
    trainer = Trainer(_config(tiny_model_name, tmp_path / "c", compile=True, num_tasks=1, task_sizes=None))
    assert set(trainer.compiled) == {"image", "text"} and trainer.learner.loss_terms is losses.training_losses


def test_teacher_copy_runs_its_own_compiled_forward(tiny_model_name):
    torch._dynamo.reset()
    model = load_model(tiny_model_name, pretrained=None)
    inject_lora(model, rank=4, alpha=4.0)
    compiling.compile_model(model, AOT)
    teacher = copy.deepcopy(model)
    assert teacher.raw_features.__self__ is teacher
    assert teacher.text_features.__self__ is teacher
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    raw_t, _ = teacher.encode_image(x)
    (grad,) = torch.autograd.grad(raw_t.sum(), x)  # DPGD's step: gradient w.r.t. the input, compiled
    compiling.uncompile_model(teacher)
    ref_raw, _ = teacher.encode_image(x)
    (ref_grad,) = torch.autograd.grad(ref_raw.sum(), x)
    torch.testing.assert_close(raw_t, ref_raw)
    torch.testing.assert_close(grad, ref_grad)
    assert not torch.allclose(model.raw_features(x), ref_raw)  # student moved: teacher used its own weights


@pytest.mark.slow
def test_models_of_other_structures_each_get_dynamos_whole_recompile_budget(tiny_model_name, request):
    """Dynamo counts compiled graphs against its recompile limit per code object. A sweep over lora.rank
    compiles towers of 3 structures in one process: with the limit at 2 here (8 by default, about 3 image
    and 2 text graphs per structure), the third model's towers must still compile, not fall back to eager.
    A second model of a structure already compiled reuses its graphs (seeds, ablation variants)."""
    torch._dynamo.reset()
    # the config's own patch, not monkeypatch.setattr: pytest 9.2 undoes that with a delattr, which deletes
    # the key from dynamo's config module for the rest of the session
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"  # torch 2.6
    patch = torch._dynamo.config.patch(**{limit: 2})
    patch.__enter__()
    request.addfinalizer(lambda: patch.__exit__(None, None, None))
    base = load_model(tiny_model_name, pretrained=None)
    x = torch.randn(2, 3, 32, 32)
    tokens = base.tokenize(["a photo of a dog.", "a cat."])

    def graphs_compiled_by(rank):
        model = copy.deepcopy(base)
        inject_lora(model, rank=rank, alpha=4.0)
        compiling.compile_model(model, AOT)
        before = compiling.compile_counters()["unique_graphs"]
        for grad in (True, False):  # two graphs per tower: what fills a limit of 2 with one structure
            with torch.set_grad_enabled(grad):
                model.raw_features(x)
                model.encode_text(tokens)
        return compiling.compile_counters()["unique_graphs"] - before
    assert [graphs_compiled_by(rank) for rank in (2, 4, 8)] == [4, 4, 4]
    assert graphs_compiled_by(4) == 0


def test_compile_sees_through_custom_ops_with_fullgraph(tiny_model_name):
    """The LoRA C++ op (when built) and every Triton op wrapper trace into one graph."""
    from segpcl_fast import ops
    torch._dynamo.reset()
    model = load_model(tiny_model_name, pretrained=None)
    inject_lora(model, rank=4, alpha=4.0)
    fn = torch.compile(type(model).raw_features, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(fn(model, x), model.raw_features(x))
    z, zt = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6)
    kl = torch.compile(lambda a, b: ops.anchor_kl(a, b, 20.0), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(kl(z, zt), ops.anchor_kl(z, zt, 20.0))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_bf16_autocast_compiled_step_is_close_to_fp32(tiny_model_name, tmp_path, precision):
    """bf16 and fp16 (with its loss scaler) autocast of the compiled step: no graph break, B close to fp32's."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = _config(tiny_model_name, tmp_path / "b", num_tasks=1, task_sizes=None, compile=True, precision=precision,
                  lr=0.05, method="lora_finetune")
    trainer = Trainer(cfg, compile_settings=AOT)
    bf16 = trainer.run()
    fp32 = Trainer(_config(tiny_model_name, tmp_path / "f", num_tasks=1, task_sizes=None, lr=0.05, method="lora_finetune"))
    fp32.run()
    assert compiling.compile_counters()["graph_breaks"] == {}
    moved = [float(v.abs().sum()) for v in _lora(trainer.model).values()]
    assert sum(moved) > 0
    for k, v in _lora(fp32.model).items():
        torch.testing.assert_close(_lora(trainer.model)[k], v, rtol=0.1, atol=5e-3)
    assert bf16.accuracy_matrix is not None


@pytest.mark.slow
@pytest.mark.parametrize("cpp_wrapper, batch_merge", [(False, True), (True, True), (False, False)])
def test_inductor_compiled_step_matches_eager(tiny_model_name, monkeypatch, cpp_wrapper, batch_merge):
    """Inductor's code for the image tower, forward and backward, gives eager's loss and gradients,
    with its Python wrapper and with its C++ one (SEGPCL_COMPILE_CPP_WRAPPER=1), which must really be
    what ran: the generated host code of both graphs is C++ (aoti_torch calls), not Python. With the
    LoRA merges batched (the default) inductor's batch_linear_post_grad pass must have fired: the
    layers' W + s B A of one shape are one bmm; with SEGPCL_COMPILE_BATCH_MERGE=0 it must not."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    batched_before = counters["inductor"]["batch_linear_post_grad"]
    model = load_model(tiny_model_name, pretrained=None)
    inject_lora(model, rank=4, alpha=4.0)
    params = [p for n, p in model.named_parameters() if "lora_B" in n and ".visual." in n]
    x = torch.randn(4, 3, 32, 32)

    def step():
        raw, emb = model.encode_image(x)
        loss = emb.square().mean() + raw.mean()
        return loss, torch.autograd.grad(loss, params)
    ref_loss, ref_grads = step()
    monkeypatch.setenv("SEGPCL_COMPILE_BATCH_MERGE", "1" if batch_merge else "0")  # the pass and the merge's form
    compiling.compile_model(model, compiling.CompileSettings(cpp_wrapper=cpp_wrapper))
    (loss, grads), codes = run_and_get_code(step)
    assert len(codes) == 2  # the forward graph and the backward graph
    assert all(("aoti_torch" in code) == cpp_wrapper for code in codes)
    # the tiny ViT's layers: each target's merges of one shape batched (2 layers a shape). torch 2.6's pass
    # batches none of them here (depths 6 to 100 tried): each merge is then its own mm, as without the switch
    batched = counters["inductor"]["batch_linear_post_grad"] > batched_before
    assert batched == (batch_merge and torch.__version__ >= "2.7"), batched
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)


def test_compiled_towers_mutate_no_input_so_cuda_graphs_can_replay_them(tiny_model_name, monkeypatch):
    """torch.compile's CUDA-graph modes (reduce-overhead, the e2e cudagraphs variants) skip a graph
    that mutates one of its inputs and run it without graphs, silently. The training step's three
    compiled graphs (image tower, text tower, loss terms), forward and backward, are traced here through
    AOTAutograd (no code generation) and their inputs checked: none is written."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._guards import TracingContext

    from segpcl_fast import ops
    from segpcl_fast.config import Config
    from segpcl_fast.engine.bench import build_step

    graphs = []

    def recording(gm, example_inputs):
        def forward_compiler(graph, inputs):
            meta = TracingContext.get().fw_metadata
            graphs.append([i for i, info in enumerate(meta.input_info) if info.mutates_data or info.mutates_metadata])
            return make_boxed_func(graph.forward)
        return aot_module_simplified(gm, example_inputs, fw_compiler=forward_compiler,
                                     bw_compiler=lambda graph, inputs: make_boxed_func(graph.forward))

    monkeypatch.setattr(compiling.CompileSettings, "options", lambda self: {"backend": recording})
    torch._dynamo.reset()
    with ops.backend("auto"):
        step = build_step(tiny_model_name, "cpu", 4, 5, 3, compile_settings=compiling.CompileSettings(),
                          cfg=Config())
        for _ in range(2):
            step()
    torch._dynamo.reset()
    assert graphs == [[], [], []], graphs  # image tower, text tower, loss terms: no input written


def test_cudagraph_skips_are_counted_with_inductors_reason():
    """cudagraph_skips reads inductor's own logger and counter (named by this torch version): a skip
    inductor logs is caught with its message; a CPU graph under reduce-overhead is counted."""
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter
    with compiling.cudagraph_skips() as found:
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs (1 instances)")
    assert found == {"count": 1, "reasons": ["skipping cudagraphs due to mutated inputs (1 instances)"]}
    torch._dynamo.reset()
    with compiling.cudagraph_skips() as found:
        fn = torch.compile(lambda x: (x * 2).sin(), mode="reduce-overhead")
        torch.testing.assert_close(fn(torch.ones(4)), torch.full((4,), 2.0).sin())
    assert found["count"] == 1 and found["reasons"] == []  # inductor does not log a CPU graph's skip
    with compiling.cudagraph_skips() as found:
        pass
    assert found == {"count": 0, "reasons": []}


def test_a_tower_run_without_cuda_graphs_is_a_warning(caplog, monkeypatch):
    """Under a CUDA-graph mode the compiled towers warn, with inductor's reason, when graphs skip CUDA
    graphs (a silent fallback would leave the step launch-bound without a word): once per skip, the
    tower's own (compiled in its call) or a backward graph's (found while the backward ran)."""
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter
    compiled = []

    def tower(x):
        if not compiled:  # the first call compiles the graph, and inductor decides against CUDA graphs
            compiled.append(1)
            log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to non-cudagraphable ops")
        return x + 1
    run = compiling._warning_on_skips(tower, "reduce-overhead", "the image tower")
    monkeypatch.setattr(compiling, "_skips_reported", compiling.cudagraph_skip_count())  # other tests' skips: seen
    with caplog.at_level("WARNING", logger="segpcl_fast.engine"):
        for _ in range(3):
            assert run(1) == 2
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs (1 instances)")  # a backward
        assert run(1) == 2
        assert run(1) == 2
    warned = [r.getMessage() for r in caplog.records if r.name == "segpcl_fast.engine"]
    assert warned == [
        "torch.compile mode 'reduce-overhead': 1 compiled graph(s) ran without CUDA graphs, seen after the image "
        "tower (skipping cudagraphs due to non-cudagraphable ops); they still run, compiled, with a launch per kernel",
        "torch.compile mode 'reduce-overhead': 1 compiled graph(s) ran without CUDA graphs, seen after the image "
        "tower (skipping cudagraphs due to mutated inputs (1 instances)); they still run, compiled, with a launch "
        "per kernel"]


def test_the_loss_terms_compile_a_bounded_number_of_graphs_across_tasks(monkeypatch):
    """compile_learner's loss graph over 8 tasks of 2 classes: the TSGR neighbour count k = min(tsgr.k,
    seen classes - 1) grows 3, 5, 7, 9, 10, the roots, old classes and batches change, and the last batch
    is short. knn_subgraph_kl's tile rule read k as an int (next_pow2) and recompiled for each k; now
    the graph guards ranges: at most one graph without ACGD / TSGR and two with them."""
    import torch.nn.functional as F

    from segpcl_fast.config import Config
    from segpcl_fast.method import losses

    class Learner:  # what compile_learner reads of a learner, the model a stub (compile_model is stubbed too)
        def __init__(self, cfg):
            self.cfg, self.model, self.loss_terms = cfg, torch.nn.Linear(2, 2), losses.training_losses

    monkeypatch.setattr(compiling, "compile_model", lambda model, settings=None: {})
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    cfg = Config()
    learner = Learner(cfg)
    compiling.compile_learner(learner, compiling.CompileSettings(backend="aot_eager"))
    ref = F.normalize(torch.randn(16, 8), dim=-1)
    ks = []
    for t in range(8):
        n_old, n_total = 2 * t, 2 * t + 2
        graph = losses.TSGRGraph.build(ref[:n_total], range(n_old, n_total), cfg.tsgr.k, cfg.tsgr.tau) if t else None
        ks.append(0 if graph is None else graph.neighbors.shape[1])
        for batch in (6, 6, 3):
            emb, text = torch.randn(batch + (4 if t else 0), 8), torch.randn(n_total, 8, requires_grad=True)
            labels = torch.randint(n_old, n_total, (batch,))
            teacher = torch.randn(4, n_old) if t else None
            args = (emb, text, labels, torch.tensor(50.0), n_old, teacher, graph, cfg)
            total, _ = learner.loss_terms(*args)
            torch.testing.assert_close(total, losses.training_losses(*args)[0])
    torch._dynamo.reset()
    assert ks == [0, 3, 5, 7, 9, 10, 10, 10]
    assert compiling.compile_counters()["unique_graphs"] <= 3, compiling.compile_counters()


def test_the_text_tower_is_one_graph_from_tokens_to_normalised_embeddings(tiny_model_name):
    """Under run.compile the text side is one graph per use from the prompts' (truncated) tokens to their
    L2-normalised embeddings: the embedding lookup, ln_final, the end-of-text gather, the projection and
    the normalisation ran as eager launches around a compiled trunk before. The same embeddings, with
    gradients, and still the truncated length (the tokens cut once, in the token cache)."""
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    model = load_model(tiny_model_name, pretrained=None)
    inject_lora(model, rank=4, alpha=4.0, towers=("visual", "text"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    eager = copy.deepcopy(model)
    assert compiling.compile_model(model, compiling.CompileSettings(backend=recording))["text"] == \
        "CLIPModel.text_features"
    prompts = [["a red dog.", "a photo of a red striped dog on grass."], ["a cat.", "a small cat."]]
    text, ref = model.class_embeddings(prompts), eager.class_embeddings(prompts)
    torch.testing.assert_close(text, ref)
    params = [p for n, p in model.named_parameters() if "lora_B" in n and ".visual." not in n]
    ref_params = [p for n, p in eager.named_parameters() if "lora_B" in n and ".visual." not in n]
    for g, r in zip(torch.autograd.grad(text.square().sum(), params), torch.autograd.grad(ref.square().sum(), ref_params)):
        torch.testing.assert_close(g, r)
    assert len(graphs) == 1  # one graph: tokens to normalised embeddings
    called = {getattr(n.target, "__name__", str(n.target)) for n in graphs[0].graph.nodes
              if n.op in ("call_function", "call_method")}
    assert {"embedding", "layer_norm", "normalize"} <= called, called
    (tokens, _, length), = model.prompt_tokens([p for ps in prompts for p in ps], torch.device("cpu"))
    assert tokens.shape[1] == length < model.clip.context_length  # cut once, at the longest end-of-text


def test_a_text_tower_run_whole_keeps_its_trunk_compiled(tmp_path):
    """A text tower the truncation does not apply to (here pooling the first token) runs open_clip's
    encode_text at full length: only its transformer trunk is compiled, as before text_features."""
    name = first_token_model_name(tmp_path, "compile-tiny-first")
    torch._dynamo.reset()
    model = load_model(name, pretrained=None)
    inject_lora(model, rank=4, alpha=4.0, towers="text")
    eager = copy.deepcopy(model)
    assert not model.truncates_text
    trunk = model.text_tower.transformer
    assert compiling.compile_model(model, AOT)["text"] == f"{type(trunk).__name__}.forward (text trunk)"
    assert "forward" in trunk.__dict__ and "text_features" not in model.__dict__
    prompts = [["a red dog."], ["a cat on a mat."]]
    (tokens, _, _), = model.prompt_tokens([p for ps in prompts for p in ps], torch.device("cpu"))
    assert tokens.shape[1] == 24  # not cut: this tower reads every position
    torch.testing.assert_close(model.class_embeddings(prompts), eager.class_embeddings(prompts))


def test_an_empty_compile_mode_or_backend_variable_is_the_default_and_a_bad_one_is_named(monkeypatch):
    """SEGPCL_COMPILE_MODE= (set but empty) was "compile mode '' is unknown", where every other switch
    (SEGPCL_OPS, SEGPCL_LORA_*) reads empty as unset; and the error did not name the variable."""
    from segpcl_fast.engine.compiling import CompileSettings
    monkeypatch.setenv("SEGPCL_COMPILE_MODE", "")
    monkeypatch.setenv("SEGPCL_COMPILE_BACKEND", "")
    s = CompileSettings.from_env()
    assert (s.mode, s.backend) == (CompileSettings().mode, CompileSettings().backend)
    monkeypatch.setenv("SEGPCL_COMPILE_MODE", "fast")
    with pytest.raises(ValueError, match=r"^SEGPCL_COMPILE_MODE: compile mode 'fast' is unknown; choose one of"):
        CompileSettings.from_env()
    monkeypatch.setenv("SEGPCL_COMPILE_MODE", "")
    monkeypatch.setenv("SEGPCL_COMPILE_BACKEND", "indcutor")  # torch.compile refused it after the data had loaded
    with pytest.raises(ValueError, match=r"^SEGPCL_COMPILE_BACKEND: torch.compile backend 'indcutor' is unknown; "
                                         r"choose one of inductor, aot_eager, eager"):
        CompileSettings.from_env()
    for backend in ("aot_eager", "eager"):  # every backend torch lists is taken
        monkeypatch.setenv("SEGPCL_COMPILE_BACKEND", backend)
        assert CompileSettings.from_env().backend == backend
