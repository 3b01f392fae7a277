"""The analysis subcommands: parse, run, print; errors are one line and exit code 2."""
import pytest

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


def test_cli_analysis_options_that_would_be_ignored_or_crash_are_refused(tmp_path, capsys, monkeypatch):
    """Each is one error line before anything trains (found by a trial: a traceback, an option that was
    dropped silently, a negative count that sliced a sample)."""
    import segpcl_fast.analysis
    monkeypatch.setattr(segpcl_fast.analysis, "fragility", lambda *a, **k: pytest.fail("fragility ran"))
    cases = [
        (["fragility", "--tasks", "abc"], "--tasks expects comma-separated 1-based task numbers"),
        (["fragility", "--set", "run.method=segpcl"], "fragility takes its method from --method (default lora_finetune)"),
        (["anchor-views", "--set", "run.method=lora_finetune"], "anchor-views takes its method from --method"),
        (["distill-sources", "--sources", ","], "--sources names nothing"),
        (["ablate", "--variants", ","], "--variants names nothing"),
        (["ablate", "--variants", "zeroshot,zeroshot"], "variant 'zeroshot' is given twice"),
        (["ablate", "--seeds", "0,0"], "seed 0 is given twice"),
        (["retention", "--variants", "segpcl,segpcl"], "variant 'segpcl' is given twice"),
        (["retention", "--datasets", "synthetic-sketch=/tmp"], "is generated, it takes no data root"),
        (["retention", "--datasets", "synthetic-sketch,synthetic-sketch"], "'synthetic-sketch' is given twice"),
        (["sweep", "--set", "optim.lr=1e-3,0.001"], "sweep point 'lr=0.001' is given twice"),
        (["distill-sources", "--sources", "anchors", "--folder", str(tmp_path)], "only used by the source 'folder'"),
        (["distill-sources", "--sources", "anchors,anchors"], "ACGD source 'anchors' is given twice"),
        (["distill-sources", "--method", "lora_finetune"], "does not use ACGD"),
        (["sweep", "--set", "optim.lr=1e-3,2e-3", "--resume"], "does not exist"),
        (["distill-sources", "--resume"], "does not exist"),
    ]
    for argv, message in cases:
        assert main([*argv, "-o", str(tmp_path / "out")]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("segpcl-fast: error: ") and message in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "out").exists()  # distill-sources' reference folder included
    for argv in (["fragility", "--max-old-images", "-5"], ["retention", "--per-class", "-3"],
                 ["fragility", "--resume"], ["anchor-views", "--resume"]):
        with pytest.raises(SystemExit):  # argparse: a usage error
            main([*argv, "-o", str(tmp_path / "out")])
    from segpcl_fast.cli import _csv
    assert _csv("zeroshot,, ", "--variants") == ["zeroshot"] and _csv(None, "--variants") is None
    out = tmp_path / "ab"
    (out / "zeroshot" / "seed0").mkdir(parents=True)
    assert main(["ablate", "--variants", "zeroshot,zeroshot", "-o", str(out), "--resume"]) == 2  # checked first too
