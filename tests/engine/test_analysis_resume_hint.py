"""A resume an analysis makes (ablate, sweep, retention, distill-sources) refused for another config: the fix is
the analysis' own command again with --resume, not `--config <its run>/config.yaml` (that file holds one variant's
resolved config: for ablate, lora_finetune's prototypes.beta = 0 fails the next variant, segpcl; its output_dir is
the run's folder, which an analysis refuses as a train run's)."""
import pytest

import segpcl_fast
from segpcl_fast.engine import checkpoint as ckpt


def _refusal(tmp_path) -> str:
    run = tmp_path / "abl" / "lora_finetune" / "seed0"
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text("run: {}\n")
    state = {"fingerprint": "aaaa", "config": {"optim": {"lr": 0.001}}}
    with pytest.raises(ckpt.CheckpointError) as refused:
        ckpt._check_fingerprint(run / "checkpoints" / "task_00.pt", state, "bbbb", {"optim": {"lr": 0.01}}, ())
    return str(refused.value)


def test_a_train_runs_refusal_names_its_own_config(tmp_path):
    assert "optim.lr was 0.001, now 0.01" in _refusal(tmp_path)
    assert "--config " + str(tmp_path / "abl" / "lora_finetune" / "seed0" / "config.yaml") in _refusal(tmp_path)


def test_an_analysis_runs_refusal_names_the_analysis_command(tmp_path):
    with ckpt.resuming_analysis("ablate"):
        text = _refusal(tmp_path)
    assert "optim.lr was 0.001, now 0.01" in text
    assert "--config" not in text and "the ablate" in text and "--resume" in text
    assert ckpt.resuming_analysis_name() is None  # given back after the block


class _Stop(Exception):
    pass


def test_ablate_and_sweep_train_their_runs_as_the_analysis(tmp_path, monkeypatch):
    import segpcl_fast.api as api

    def train(cfg):
        raise _Stop(ckpt.resuming_analysis_name())
    monkeypatch.setattr(api, "train", train)
    with pytest.raises(_Stop, match="ablate"):
        segpcl_fast.ablate(variants=["lora_finetune"], run__output_dir=str(tmp_path / "a"))
    from segpcl_fast.analysis import sweep
    with pytest.raises(_Stop, match="sweep"):
        sweep(axes={"dpgd.k_adv": [5, 10]}, run__output_dir=str(tmp_path / "s"))
    assert ckpt.resuming_analysis_name() is None
