"""benchmarks/summary.py: the comparison tables printed after `pytest benchmarks/ --benchmark-only`,
checked on hand-made results (ratios computed by hand)."""
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
    assert "| anchor_kl | paper | cuda | triton | 1.000 | 4.00 | 2.00 | 900.0 | 0.3 |" in table
    assert "| anchor_kl | paper | cuda | eager_reference | 4.000 | 1.00 | 0.50 | - | - |" in table
    assert "no Triton rows" not in table
    assert "no Triton rows" in summary.kernel_table(rows[:2])


def test_lora_rows_are_times_over_the_base_linear_fastest_first():
    info = dict(tokens=8, n_in=4, n_out=6, rank=2, dtype="torch.bfloat16", device="cuda")
    rows = [_bench("l", 0.010, {"impl": "base_linear"}, saved_activation_bytes=0, **info),
            _bench("l", 0.012, {"impl": "segpcl_cpp"}, saved_activation_bytes=2 ** 20, **info),
            _bench("l", 0.009, {"impl": "segpcl_compiled"}, saved_activation_bytes=2 ** 19, **info)]
    lines = summary.lora_table(rows).splitlines()[2:]
    assert [line.split(" | ")[1] for line in lines] == ["segpcl_compiled", "base_linear", "segpcl_cpp"]
    assert "| cuda | segpcl_cpp | 12.000 | 1.20 | 1.00 | 8 x 4 -> 6, r 2, torch.bfloat16 |" in lines


def test_e2e_and_transform_rows_and_empty_kinds():
    e2e = _bench("test_e2e_step[cuda-compiled_fused]", 0.5, {"variant": "compiled_fused"}, device_name="H100",
                 model="ViT-B-16", precision="bf16", batch=128, anchors=128, step_ms=500.0, images_per_s=256.0,
                 achieved_tflops=100.0, mfu=0.25, matmul_peak_tflops=400.0)
    assert "| H100 | ViT-B-16 (bf16, batch 128+128) | compiled_fused | 500.0 | 256.0 | 100.0000 | 25.0% | 400.000 |" \
        in summary.e2e_table([e2e])
    t = [_bench("t", 0.001, case="c", kind="test", impl="segpcl"), _bench("t", 0.003, case="c", kind="test",
                                                                          impl="torchvision")]
    assert "| c | test | 1.0000 | 3.0000 | 3.00 |" in summary.transforms_table(t)
    text = summary.summarize([e2e] + t)
    assert "End-to-end training step" in text and "CLIP image transforms" in text and "LoRA" not in text
    assert summary.summarize([]) == ""
