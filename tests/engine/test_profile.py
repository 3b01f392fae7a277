"""`segpcl-fast profile` on CPU: trace, top-ops table, stage ranges, ncu command."""
import json

import pytest

from segpcl_fast.api import make_config
from segpcl_fast.engine.profile import STAGES, ncu_command, profile_training, stage_ranges


def _config(model_name, out, **kw):
    base = dict(model__name=model_name, model__pretrained=None, max_train_per_class=2, max_test_per_class=1,
                num_tasks=2, epochs=1, optim__batch_size=16, dpgd__k_adv=2, dpgd__k_seed=1, output_dir=str(out),
                num_threads=1)
    base.update(kw)
    return make_config(**base)


def test_profile_writes_trace_table_and_every_stage(tiny_model_name, tmp_path):
    out = profile_training(_config(tiny_model_name, tmp_path / "unused"), tmp_path / "prof", steps=2)
    trace = json.loads((tmp_path / "prof" / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    expected = {"dpgd", "student_forward_losses", "image_forward", "text_forward", "losses.cls", "losses.acgd",
                "losses.gr", "backward", "optimizer", "prototypes"}
    assert expected <= names, expected - names
    assert set(out["stages"]) >= expected and set(out["stages"]) <= set(STAGES)
    assert out["stages"]["student_forward_losses"]["calls"] == 2 and out["stages"]["optimizer"]["calls"] == 2
    # nested ranges: the loss terms lie inside the student step, which is bounded by its range
    assert out["stages"]["losses.cls"]["ms"] <= out["stages"]["student_forward_losses"]["ms"]
    table = (tmp_path / "prof" / "top_ops.txt").read_text()
    assert "Self CPU" in table and out["top_kernel"] and out["top_kernel"] in table
    assert "dpgd" in (tmp_path / "prof" / "stages.txt").read_text()
    assert not (tmp_path / "unused").exists() or not any((tmp_path / "unused").glob("checkpoints/*"))


def test_stage_ranges_are_removed_afterwards():
    from segpcl_fast.method import losses
    from segpcl_fast.model.clip import CLIPModel
    before = (CLIPModel.encode_image, losses.cls_loss)
    with stage_ranges():
        assert CLIPModel.encode_image is not before[0] and losses.cls_loss is not before[1]
    assert (CLIPModel.encode_image, losses.cls_loss) == before


def test_ncu_command_names_the_kernel_and_reruns_profile():
    cmd = ncu_command("void at::native::vectorized_elementwise_kernel<4, ...>(int, ...)", ["--set", "run.compile=true",
                                                                                          "--steps", "1"])
    assert cmd.startswith("ncu --kernel-name regex:vectorized_elementwise_kernel --launch-skip")
    assert "segpcl_fast.cli profile --set run.compile=true --steps 1" in cmd


def test_cli_profile(tiny_model_name, tmp_path, capsys):
    from segpcl_fast.cli import main
    args = ["profile", "--set", f"model.name={tiny_model_name}", "--set", "model.pretrained=none",
            "--set", "data.max_train_per_class=1", "--set", "data.max_test_per_class=1", "--set", "data.num_tasks=2",
            "--set", "run.num_threads=1", "--steps", "1", "-o", str(tmp_path / "p")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "trace.json" in printed and "ncu --kernel-name" in printed and "student_forward_losses" in printed
    assert (tmp_path / "p" / "trace.json").exists()
    # the printed ncu command profiles one step into its own folder, not over this one
    ncu = next(line for line in printed.splitlines() if "ncu --kernel-name" in line)
    assert ncu.count("--steps") == 1 and f"-o {tmp_path / 'p'}-ncu" in ncu
    # run.output_dir from --set is where the profile goes when -o is not given
    assert main(args[:-2] + ["--set", f"run.output_dir={tmp_path / 'q'}"]) == 0
    assert (tmp_path / "q" / "trace.json").exists()
