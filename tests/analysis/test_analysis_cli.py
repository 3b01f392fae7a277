"""The analysis subcommands: parse, run, print; errors are one line and exit code 2."""
from segpcl_fast.cli import main


def _tiny_args(tiny_model_name, out):
    return ["--set", f"model.name={tiny_model_name}", "--set", "model.pretrained=none",
            "--set", "data.max_train_per_class=2", "--set", "data.max_test_per_class=2",
            "--set", "data.num_tasks=2", "--set", "optim.epochs=1", "--set", "dpgd.k_adv=1",
            "--set", "dpgd.k_seed=1", "--set", "run.progress=false", "-o", str(out)]


def test_cli_anchor_views_prints_table_and_files(tiny_model_name, tmp_path, capsys):
    assert main(["anchor-views", *_tiny_args(tiny_model_name, tmp_path / "av"), "--task", "2"]) == 0
    printed = capsys.readouterr().out
    assert "DPGD anchors" in printed and "anchor_views.png" in printed
    assert (tmp_path / "av" / "anchor_views.json").exists()


def test_cli_sweep_errors_before_running(tmp_path, capsys):
    assert main(["sweep", "--set", "dpgd.k_adv=5,x", "-o", str(tmp_path / "sw")]) == 2
    err = capsys.readouterr().err
    assert "k_adv=x" in err and "expects an integer" in err
    assert not (tmp_path / "sw").exists()
    assert main(["sweep", "--set", "dpgd.kadv=5,10"]) == 2
    assert "unknown config key 'dpgd.kadv'" in capsys.readouterr().err


def test_cli_retention_and_fragility_argument_errors(capsys):
    assert main(["retention", "--datasets", "food101"]) == 2
    assert "food101=" in capsys.readouterr().err
    assert main(["fragility", "--threshold", "mean"]) == 2
    assert "threshold" in capsys.readouterr().err
    assert main(["distill-sources", "--sources", "anchors,pixels"]) == 2
    assert "unknown ACGD source" in capsys.readouterr().err
