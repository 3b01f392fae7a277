"""The comparisons each benchmark file exists for, as Markdown tables, from pytest-benchmark results.

pytest-benchmark's own table lists every benchmark by time, its ratio column relative to the
fastest row of a group. These tables put each fast path next to what it is measured against:

- kernels: each Triton op vs its eager reference and torch.compile of the reference (x eager,
  x compiled: speed-ups, > 1 is faster; over CUDA-event device time where every row has it, else
  the host-timed median), achieved GB/s and fraction of the measured copy bandwidth;
- lora: each LoRA-B linear implementation vs the frozen base nn.Linear (time / base: the
  issue-6 target is <= 1.1 on a GPU) and its saved-activation bytes;
- e2e: the training step's images/s (task images; as many anchors run with them, and are in the
  FLOPs) and MFU (model FLOPs / median step time / the matmul peak measured in the same session);
- transforms: each CLIP transform per image vs torchvision's Compose of the same steps.

`benchmarks/conftest.py` prints them at the end of `pytest benchmarks/ --benchmark-only`;
`python benchmarks/summary.py RESULTS.json [...]` prints them from --benchmark-json files (exit 1,
with the reason on stderr, when no file gave a table: a missing file is "no such file", an unreadable
or cut-off one a pytest run stopped before writing its JSON; the files that load still print).
Each function takes the "benchmarks" list of that JSON (dicts with name, params, stats,
extra_info) and returns "" when it holds no row of its kind.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Callable


def load(path: str) -> list[dict]:
    """The benchmarks of one --benchmark-json file; [] with a note on stderr when there is none."""
    try:
        with open(path) as f:
            return json.load(f)["benchmarks"]
    except FileNotFoundError:
        print(f"{path}: no such file", file=sys.stderr)
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"{path}: no benchmark results ({type(exc).__name__}; the pytest run was stopped before "
              "writing its JSON: give it more time, e.g. STEP_TIMEOUT / BUDGET in gpu_suite.sh)", file=sys.stderr)
        return []


def _ms(bench: dict) -> float:
    return bench["stats"]["median"] * 1e3


def kernel_table(benchmarks: list[dict]) -> str:
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for bench in benchmarks:
        info = bench.get("extra_info", {})
        if "op" in info and "impl" in info:
            groups[(info["op"], info["size"], info["device"])][info["impl"]] = dict(ms=_ms(bench), **info)
    if not groups:
        return ""
    lines = ["| op | size | device | impl | median ms (host) | device ms (events) | x eager | x compiled | GB/s (or TFLOP/s) | "
             "of copy BW |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (op, size, device), impls in sorted(groups.items()):
        # speed-ups over device time (CUDA events) where every row of the group has it, else host time
        key = "device_ms" if all("device_ms" in row for row in impls.values()) else "ms"
        eager = impls.get("eager_reference", {}).get(key)
        compiled = impls.get("compiled_reference", {}).get(key)
        for impl, row in sorted(impls.items()):
            ratio = lambda base: f"{base / row[key]:.2f}" if base else "-"  # noqa: E731
            # a compute-bound row (attention) reports TFLOP/s where the memory-bound ones report GB/s
            rate = row.get("achieved_GBps", f"{row['achieved_tflops']} TFLOP/s" if "achieved_tflops" in row else "-")
            lines.append(f"| {op} | {size} | {device} | {impl} | {row['ms']:.3f} | {row.get('device_ms', '-')} | "
                         f"{ratio(eager)} | {ratio(compiled)} | {rate} | "
                         f"{row.get('fraction_of_copy_bandwidth', '-')} |")
    if not any("triton" in impls for impls in groups.values()):
        lines.append("\n(no Triton rows: the kernels run on CUDA only, so these are the references, eager vs "
                     "compiled)")
    return "\n".join(lines)


def lora_table(benchmarks: list[dict]) -> str:
    by_device: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in benchmarks:
        info = bench.get("extra_info", {})
        if "saved_activation_bytes" in info:
            by_device[info["device"]][bench["params"]["impl"]] = dict(ms=_ms(bench), **info)
    if not by_device:
        return ""
    lines = ["| device | impl | fwd+bwd ms (median) | time / base linear | saved activations MB | "
             "kept weight-shaped MB | shape |",
             "|---|---|---|---|---|---|---|"]
    for device, impls in sorted(by_device.items()):
        base = impls.get("base_linear", {}).get("ms")
        for impl, row in sorted(impls.items(), key=lambda kv: kv[1]["ms"]):
            ratio = f"{row['ms'] / base:.2f}" if base else "-"
            shape = f"{row['tokens']} x {row['n_in']} -> {row['n_out']}, r {row['rank']}, {row['dtype']}"
            kept = "-" if "saved_weight_shaped_bytes" not in row else f"{row['saved_weight_shaped_bytes'] / 2 ** 20:.2f}"
            lines.append(f"| {device} | {impl} | {row['ms']:.3f} | {ratio} | "
                         f"{row['saved_activation_bytes'] / 2 ** 20:.2f} | {kept} | {shape} |")
    return "\n".join(lines)


def e2e_table(benchmarks: list[dict]) -> str:
    rows = ["| device | model | variant | step ms (median) | task images/s | TFLOP/s | MFU | matmul peak TFLOP/s | "
            "host syncs / step | graphs without CUDA graphs |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for b in benchmarks:
        e = dict(b.get("extra_info", {}))
        if "test_e2e_step" not in b["name"]:
            continue
        variant = b["params"]["variant"]
        if "mfu" not in e:  # stopped in its rounds: from the median of the rounds it wrote
            stats = b.get("stats") or {}
            median, rounds = stats.get("median"), stats.get("rounds", 0)
            # all its rounds and still no mfu: the test failed after them (a non-finite loss), no row
            if not median or "step_flops" not in e or rounds >= e.get("rounds_planned", 0):
                continue
            e.update(step_ms=median * 1e3, images_per_s=e["batch"] / median,
                     achieved_tflops=e["step_flops"] / median / 1e12,
                     mfu=e["step_flops"] / median / (e["matmul_peak_tflops"] * 1e12))
            variant += f" (stopped after {rounds} rounds)"
        # the text tower's precision, and TF32 for fp32 matmuls (run.tf32), where the JSON records them
        text = f", text {e['text_precision']}{' TF32' if e.get('tf32') else ''}" if "text_precision" in e else ""
        rows.append(f"| {e['device_name']} | {e['model']} ({e['precision']}{text}, batch {e['batch']}+{e['anchors']}) | "
                    f"{variant} | {e['step_ms']:.1f} | {e['images_per_s']:.1f} | "
                    f"{e['achieved_tflops']:.4f} | {100 * e['mfu']:.1f}% | {e['matmul_peak_tflops']:.3f} | "
                    f"{e.get('host_syncs_per_step', '-')} | {e.get('cudagraph_skips', '-')} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def transforms_table(benchmarks: list[dict]) -> str:
    groups: dict[tuple, dict[str, float]] = defaultdict(dict)
    for bench in benchmarks:
        info = bench.get("extra_info", {})
        if "case" in info and "kind" in info:
            groups[(info["case"], info["kind"])][info["impl"]] = _ms(bench)
    if not groups:
        return ""
    lines = ["| case | transform | segpcl ms / image | torchvision ms / image | x torchvision |",
             "|---|---|---|---|---|"]
    for (case, kind), impls in sorted(groups.items()):
        ours, theirs = impls.get("segpcl"), impls.get("torchvision")
        cell = lambda v: f"{v:.4f}" if v else "-"  # noqa: E731
        ratio = f"{theirs / ours:.2f}" if ours and theirs else "-"
        lines.append(f"| {case} | {kind} | {cell(ours)} | {cell(theirs)} | {ratio} |")
    return "\n".join(lines)


TABLES = {"Triton ops vs their references (x: speed-up, > 1 is faster)": kernel_table,
          "LoRA-B linear fwd+bwd vs the frozen base linear (issue-6 target on GPU: <= 1.1)": lora_table,
          "End-to-end training step": e2e_table,
          "CLIP image transforms vs torchvision (x: speed-up)": transforms_table}


def summarize(benchmarks: list[dict]) -> str:
    """Every table that has rows, each under its title."""
    parts = [f"{title}\n\n{table}" for title, fn in TABLES.items() if (table := fn(benchmarks))]
    return "\n\n".join(parts)


def main(paths: list[str], table: Callable[[list[dict]], str] = summarize) -> int:
    """Print `table` of the benchmarks in `paths` (the files that load); 0, or 1 with the reason on
    stderr when that gives no table at all (summarize_kernels.py and test_bench_e2e.py use it too)."""
    loaded = [load(path) for path in paths]
    seen: dict[str, list[str]] = defaultdict(list)
    for path, benchmarks in zip(paths, loaded):
        for bench in benchmarks:
            seen[bench.get("fullname", bench.get("name", "?"))].append(path)
    repeated = {name: files for name, files in seen.items() if len(files) > 1}
    if repeated:  # the op, LoRA and transform tables hold one row per benchmark: the last file's
        name, files = next(iter(repeated.items()))
        print(f"note: {len(repeated)} benchmark(s) appear in several files (e.g. {name} in {', '.join(files)}); "
              f"the op, LoRA and transform tables show the last file's row of each, the e2e table every row; "
              f"summarise one run per call to compare runs", file=sys.stderr)
    text = table([b for benchmarks in loaded for b in benchmarks])
    if not text:
        n_read = sum(1 for benchmarks in loaded if benchmarks)
        why = ("no file held benchmark results" if not n_read else
               f"the {n_read} file(s) with results hold no row of this table's kind")
        print(f"no table: {why}", file=sys.stderr)
        return 1
    print(text)
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/summary.py BENCHMARK_JSON [MORE.json ...]")
    sys.exit(main(sys.argv[1:]))
