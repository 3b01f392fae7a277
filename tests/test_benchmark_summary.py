"""benchmarks/summary.py: the comparison tables printed after `pytest benchmarks/ --benchmark-only`,
checked on hand-made results (ratios computed by hand), and the command lines' exit status and
messages on missing, cut-off and empty files."""
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import summary  # noqa: E402


def _bench(name, median_s, params=None, **extra_info):
    return {"name": name, "params": params or {}, "stats": {"median": median_s}, "extra_info": extra_info}


def test_kernel_rows_are_speed_ups_over_eager_and_compiled():
    rows = [_bench("k", 0.004, op="anchor_kl", impl="eager_reference", size="paper", device="cuda"),
            _bench("k", 0.002, op="anchor_kl", impl="compiled_reference", size="paper", device="cuda"),
            _bench("k", 0.001, op="anchor_kl", impl="triton", size="paper", device="cuda", achieved_GBps=900.0,
                   fraction_of_copy_bandwidth=0.3)]
    table = summary.kernel_table(rows)
    assert "| anchor_kl | paper | cuda | triton | 1.000 | - | 4.00 | 2.00 | 900.0 | 0.3 |" in table
    assert "| anchor_kl | paper | cuda | eager_reference | 4.000 | - | 1.00 | 0.50 | - | - |" in table
    assert "no Triton rows" not in table
    assert "no Triton rows" in summary.kernel_table(rows[:2])
    # with CUDA-event times on every row, the speed-ups are over those, not the host-timed medians
    for row, device_ms in zip(rows, (0.9, 0.3, 0.1)):
        row["extra_info"]["device_ms"] = device_ms
    table = summary.kernel_table(rows)
    assert "| anchor_kl | paper | cuda | triton | 1.000 | 0.1 | 9.00 | 3.00 | 900.0 | 0.3 |" in table


def test_lora_rows_are_times_over_the_base_linear_fastest_first():
    info = dict(tokens=8, n_in=4, n_out=6, rank=2, dtype="torch.bfloat16", device="cuda")
    rows = [_bench("l", 0.010, {"impl": "base_linear"}, saved_activation_bytes=0, **info),
            _bench("l", 0.012, {"impl": "segpcl_cpp"}, saved_activation_bytes=2 ** 20, **info),
            _bench("l", 0.009, {"impl": "segpcl_compiled"}, saved_activation_bytes=2 ** 19,
                   saved_weight_shaped_bytes=3 * 2 ** 19, **info)]
    lines = summary.lora_table(rows).splitlines()[2:]
    assert [line.split(" | ")[1] for line in lines] == ["segpcl_compiled", "base_linear", "segpcl_cpp"]
    assert "| cuda | segpcl_cpp | 12.000 | 1.20 | 1.00 | - | 8 x 4 -> 6, r 2, torch.bfloat16 |" in lines
    assert "| cuda | segpcl_compiled | 9.000 | 0.90 | 0.50 | 1.50 | 8 x 4 -> 6, r 2, torch.bfloat16 |" in lines


def test_e2e_and_transform_rows_and_empty_kinds():
    e2e = _bench("test_e2e_step[cuda-compiled_fused]", 0.5, {"variant": "compiled_fused"}, device_name="H100",
                 model="ViT-B-16", precision="bf16", batch=128, anchors=128, step_ms=500.0, images_per_s=256.0,
                 achieved_tflops=100.0, mfu=0.25, matmul_peak_tflops=400.0, host_syncs_per_step=0)
    assert "| H100 | ViT-B-16 (bf16, batch 128+128) | compiled_fused | 500.0 | 256.0 | 100.0000 | 25.0% | 400.000 | 0 | - |" \
        in summary.e2e_table([e2e])
    tf32 = dict(e2e, extra_info=dict(e2e["extra_info"], text_precision="fp32", tf32=True))
    assert "| H100 | ViT-B-16 (bf16, text fp32 TF32, batch 128+128) | compiled_fused |" in summary.e2e_table([tf32])
    plain = dict(e2e, extra_info=dict(e2e["extra_info"], text_precision="bf16", tf32=False))
    assert "| H100 | ViT-B-16 (bf16, text bf16, batch 128+128) | compiled_fused |" in summary.e2e_table([plain])
    graphs = dict(e2e, params={"variant": "cudagraphs_fused"}, extra_info=dict(e2e["extra_info"], cudagraph_skips=2))
    assert summary.e2e_table([graphs]).endswith("| cudagraphs_fused | 500.0 | 256.0 | 100.0000 | 25.0% | 400.000 | 0 | 2 |")
    t = [_bench("t", 0.001, case="c", kind="test", impl="segpcl"), _bench("t", 0.003, case="c", kind="test",
                                                                          impl="torchvision")]
    assert "| c | test | 1.0000 | 3.0000 | 3.00 |" in summary.transforms_table(t)
    text = summary.summarize([e2e] + t)
    assert "End-to-end training step" in text and "CLIP image transforms" in text and "LoRA" not in text
    assert summary.summarize([]) == ""


def test_an_e2e_run_stopped_in_its_rounds_is_a_row_from_the_rounds_it_wrote():
    """gpu_suite stops a step at its limit; the JSON then holds the rounds done and the fields recorded
    before them (FLOPs, peak), not step_ms / mfu: the row comes from the median, marked as stopped.
    Hand-computed: 19.37 TFLOP over 0.1033 s = 187.5 TFLOP/s, / 787.7 = 23.8 %, 128 / 0.1033 = 1239.1."""
    stopped = _bench("test_e2e_step[cuda-eager_fused]", 0.1033, {"variant": "eager_fused"}, device_name="H200",
                     model="ViT-B-16", precision="bf16", batch=128, anchors=128, step_flops=19.37e12,
                     matmul_peak_tflops=787.7, rounds_planned=20)
    stopped["stats"]["rounds"] = 18
    assert ("| H200 | ViT-B-16 (bf16, batch 128+128) | eager_fused (stopped after 18 rounds) | 103.3 | 1239.1 | "
            "187.5121 | 23.8% | 787.700 | - |") in summary.e2e_table([stopped])
    no_flops = _bench("test_e2e_step[cuda-eager_fused]", 0.1, {"variant": "eager_fused"})
    assert summary.e2e_table([no_flops]) == ""  # a run stopped before it recorded anything: no row
    failed = dict(stopped, stats={"median": 0.1033, "rounds": 20})  # every round, then its loss check failed
    assert summary.e2e_table([failed]) == ""


# the command lines (summary.py, summarize_kernels.py, test_bench_e2e.py): what a missing, a cut-off
# and an empty file say, and the exit status (1 only when no table came out at all)

ROOT = Path(__file__).resolve().parents[1]
E2E = _bench("test_e2e_step[cuda-compiled_fused]", 0.5, {"variant": "compiled_fused"}, device_name="H100",
             model="ViT-B-16", precision="bf16", batch=128, anchors=128, step_ms=500.0, images_per_s=256.0,
             achieved_tflops=100.0, mfu=0.25, matmul_peak_tflops=400.0)
KERNEL = _bench("k", 0.004, op="anchor_kl", impl="eager_reference", size="paper", device="cuda")


def _files(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"benchmarks": [E2E, KERNEL]}))
    cut = tmp_path / "cut.json"
    cut.write_text(good.read_text()[:40])
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"benchmarks": []}))
    return good, cut, empty, tmp_path / "mistyped.json"


def test_main_says_why_there_is_no_table(tmp_path, capsys):
    good, cut, empty, missing = _files(tmp_path)
    assert summary.load(str(missing)) == [] and summary.load(str(cut)) == []
    err = capsys.readouterr().err
    assert f"{missing}: no such file\n" in err and "stopped before" not in err.split(str(cut))[0]
    assert f"{cut}: no benchmark results (JSONDecodeError; the pytest run was stopped before writing its JSON" in err

    assert summary.main([str(missing)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "no such file" in err and "no table: no file held benchmark results" in err
    assert summary.main([str(cut)]) == 1
    assert "stopped before writing its JSON" in capsys.readouterr().err
    assert summary.main([str(empty)]) == 1
    assert summary.main([str(good)], summary.lora_table) == 1
    assert "the 1 file(s) with results hold no row of this table's kind" in capsys.readouterr().err
    # some of several files missing: what loads still prints, exit 0
    assert summary.main([str(missing), str(good), str(cut)]) == 0
    out, err = capsys.readouterr()
    assert "End-to-end training step" in out and "Triton ops vs their references" in out
    assert "no such file" in err and "stopped before" in err and "no table" not in err


def test_a_benchmark_in_several_files_is_named_not_silently_dropped(tmp_path, capsys):
    rows = [_bench("k", 0.004, op="anchor_kl", impl="triton", size="paper", device="cuda")]
    files = []
    for i, ms in enumerate((0.004, 0.002)):
        rows[0]["stats"]["median"] = ms
        files.append(tmp_path / f"run{i}.json")
        files[-1].write_text(json.dumps({"benchmarks": rows}))
    assert summary.main([str(f) for f in files]) == 0
    out, err = capsys.readouterr()
    assert "| triton | 2.000 |" in out  # the last file's row
    assert f"1 benchmark(s) appear in several files (e.g. k in {files[0]}, {files[1]})" in err
    assert summary.main([str(files[0])]) == 0 and "several files" not in capsys.readouterr().err


def _run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)],
                          check=False, capture_output=True, text=True, timeout=120)


def test_scripts_exit_1_without_a_table_and_name_a_missing_file(tmp_path):
    good, cut, _, missing = _files(tmp_path)
    for script in ("summary.py", "summarize_kernels.py", "test_bench_e2e.py"):
        run = _run(script, missing)
        assert run.returncode == 1 and run.stdout == "", (script, run.stdout, run.stderr)
        assert f"{missing}: no such file" in run.stderr and "stopped before" not in run.stderr, script
    run = _run("summarize_kernels.py", cut)
    assert run.returncode == 1 and "stopped before writing its JSON" in run.stderr
    run = _run("summary.py", good, missing)
    assert run.returncode == 0 and "| H100 | ViT-B-16" in run.stdout and "no such file" in run.stderr
    run = _run("summarize_kernels.py", good)
    assert run.returncode == 0 and "| anchor_kl | paper | cuda | eager_reference |" in run.stdout
    run = _run("test_bench_e2e.py", good, missing)
    assert run.returncode == 0 and "| H100 | ViT-B-16" in run.stdout and "no such file" in run.stderr


def test_kernel_table_shows_an_attention_rows_tflops():
    """The attention benchmark's rows (compute-bound) carry achieved_tflops, not GB/s: the table shows it."""
    from summary import kernel_table
    rows = [{"stats": {"median": 0.002}, "extra_info": {"op": "attention", "size": "vit", "device": "cuda",
                                                        "impl": "flash", "achieved_tflops": 123.4}},
            {"stats": {"median": 0.001}, "extra_info": {"op": "pgd_step", "size": "paper", "device": "cuda",
                                                        "impl": "triton", "achieved_GBps": 1325.0}}]
    table = kernel_table(rows)
    assert "| 123.4 TFLOP/s |" in table and "| 1325.0 |" in table


def test_saved_bytes_split_activations_from_the_kept_merged_weight():
    """benchmarks/conftest.saved_bytes_by_rows: the merged LoRA arrangement keeps u = x A^T (N x r, an
    activation) and W + s B A (out x in, whatever N) for its backward; the split counts each where it
    belongs, and the total is what saved_bytes counts."""
    import importlib.util

    import torch
    spec = importlib.util.spec_from_file_location("benchmarks_conftest", Path(summary.__file__).with_name("conftest.py"))
    bench_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_conftest)
    saved_bytes, saved_bytes_by_rows = bench_conftest.saved_bytes, bench_conftest.saved_bytes_by_rows
    from segpcl_fast.ops.lora_linear import lora_b_linear_merged
    n, n_in, n_out, r = 10, 6, 7, 3
    x = torch.randn(n, n_in, requires_grad=True)
    w, b, a = torch.randn(n_out, n_in), torch.randn(n_out), torch.randn(r, n_in)
    lora_b = torch.randn(n_out, r, requires_grad=True)
    layer = lambda: lora_b_linear_merged(x, w, b, a, lora_b, 0.5)  # noqa: E731
    _, activations, kept = saved_bytes_by_rows(layer, [w, b, a, lora_b], rows=n)
    assert activations == n * r * 4 and kept == n_out * n_in * 4
    assert saved_bytes(layer, [w, b, a, lora_b])[1] == activations + kept
