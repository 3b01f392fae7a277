"""A run's dataset side files and split after the run: paths written relative to the starting folder,
side files that moved, and a data root that splits the same images otherwise (engine/trainer.py
absolute_locations, checkpoint.check_split)."""
import shutil

import pytest

from data_fakes import IMR_WNIDS, make_imagenet_r
from segpcl_fast.api import evaluate, make_config, train
from segpcl_fast.config import load_config
from segpcl_fast.data.base import legacy_split_digest, split_digest
from segpcl_fast.data.imagenet_r import load_imagenet_r
from segpcl_fast.engine.checkpoint import CheckpointError


def _split_files(root, n_test=2):
    """train.txt / test.txt: the last n_test images of each class are test (not the seeded 80/20 split)."""
    train, test = [], []
    for c, wnid in enumerate(sorted(IMR_WNIDS)):
        files = sorted(p.name for p in (root / "imagenet-r" / wnid).iterdir())
        for i, name in enumerate(files):
            (test if i >= len(files) - n_test else train).append(f"imagenet-r/{wnid}/{name} {c}")
    (root / "train.txt").write_text("\n".join(train) + "\n")
    (root / "test.txt").write_text("\n".join(test) + "\n")


def test_split_digest_follows_the_split_not_the_root(tmp_path):
    root = make_imagenet_r(tmp_path / "a")
    _split_files(root)
    copy = tmp_path / "b"
    shutil.copytree(root, copy)
    digest = split_digest(*load_imagenet_r(str(root)))
    assert legacy_split_digest(*load_imagenet_r(str(root))) is None  # files' digests never changed: not hashed twice
    assert split_digest(*load_imagenet_r(str(copy))) == digest  # the same split elsewhere
    for name in ("train.txt", "test.txt"):
        (copy / name).unlink()
    assert split_digest(*load_imagenet_r(str(copy))) != digest  # the seeded split of the same files


def test_ucf101_videos_are_keyed_by_name_and_older_digests_still_match(tmp_path):
    """UCF101's VideoFrameDataset was keyed by index, so two splits with the same per-class counts had one digest (a
    review's finding): its videos (`sources`) are keyed by name now; a checkpoint holding the older digest is still
    this split's (check_split's legacy_digest), and a checkpoint of the other split is refused."""
    from segpcl_fast.data.ucf101 import VideoFrameDataset
    from segpcl_fast.engine.checkpoint import check_split

    def split(test_group):
        frames = {g: tmp_path / "frames" / "Archery" / f"v_Archery_g0{g}_c01.jpg" for g in (1, 2, 3)}
        for path in frames.values():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
        train = [str(frames[g]) for g in (1, 2, 3) if g != test_group]
        return (VideoFrameDataset(train, [0, 0], ["archery"]),
                VideoFrameDataset([str(frames[test_group])], [0], ["archery"]))
    one, other = split(3), split(1)
    assert split_digest(*one) != split_digest(*other)  # other videos in test: another split
    assert split_digest(*one, legacy=True) == split_digest(*other, legacy=True)  # what the index key missed
    assert legacy_split_digest(*one) == split_digest(*one, legacy=True)  # the trainer's, for check_split
    check_split("c.pt", {"split_digest": split_digest(*one)}, split_digest(*one), split_digest(*one, legacy=True))
    check_split("c.pt", {"split_digest": split_digest(*one, legacy=True)}, split_digest(*one),
                split_digest(*one, legacy=True))  # written before the change
    with pytest.raises(CheckpointError, match="another train / test split"):
        check_split("c.pt", {"split_digest": split_digest(*other)}, split_digest(*one), split_digest(*one, legacy=True))


def test_a_run_with_relative_side_files_evaluates_from_anywhere_and_refuses_another_split(tiny_model_name, tmp_path,
                                                                                        monkeypatch):
    root = make_imagenet_r(tmp_path / "imr", readme=False)
    _split_files(root)
    start = tmp_path / "start"
    start.mkdir()
    (start / "names.txt").write_text("".join(f"{w} {n}\n" for w, n in sorted(IMR_WNIDS.items())))
    monkeypatch.chdir(start)
    cfg = make_config(model__name=tiny_model_name, model__pretrained=None, data__dataset="imagenet-r",
                      data__root=str(root), data__names_file="names.txt", data__expected_classes=None,
                      num_tasks=2, epochs=1, optim__batch_size=8, dpgd__k_adv=1, dpgd__k_seed=1,
                      output_dir=str(tmp_path / "run"), progress=False, plots=False, num_threads=1)
    train(cfg)
    assert load_config(tmp_path / "run" / "config.yaml").data.names_file == str(start / "names.txt")
    acc = evaluate(tmp_path / "run")["acc"]
    monkeypatch.chdir(tmp_path)  # elsewhere: the saved path is absolute
    assert evaluate(tmp_path / "run")["acc"] == acc
    moved = tmp_path / "moved.txt"  # the side file moved: evaluate may be pointed at it
    (start / "names.txt").rename(moved)
    assert evaluate(tmp_path / "run", data__names_file=str(moved))["acc"] == acc
    copy = tmp_path / "copy"  # the same images without their split files: the seeded split
    shutil.copytree(root, copy)
    for name in ("train.txt", "test.txt"):
        (copy / name).unlink()
    with pytest.raises(CheckpointError, match="another train / test split than data.root gives now"):
        evaluate(tmp_path / "run", data__root=str(copy), data__names_file=str(moved))


def test_a_partial_copy_at_evaluate_or_resume_names_the_runs_own_data(tiny_model_name, tmp_path):
    """A run of 4 classes (data.expected_classes=4) evaluated or resumed on a copy missing one class: the
    error's fix was a new run's ("set data.expected_classes=3"), which evaluate then refused as an override
    (a review's finding). It now names the run's own data, and how to point evaluate / --resume at it."""
    from segpcl_fast.data import DatasetFormatError
    root = make_imagenet_r(tmp_path / "imr")
    run = tmp_path / "run"
    cfg = make_config(model__name=tiny_model_name, model__pretrained=None, data__dataset="imagenet-r",
                      data__root=str(root), data__expected_classes=len(IMR_WNIDS), num_tasks=2, epochs=1,
                      optim__batch_size=8, dpgd__k_adv=1, dpgd__k_seed=1, output_dir=str(run), progress=False,
                      plots=False, num_threads=1)
    train(cfg)
    partial = tmp_path / "partial"
    shutil.copytree(root, partial)
    shutil.rmtree(partial / "imagenet-r" / sorted(IMR_WNIDS)[0])
    fix = r"point data.root at the copy of the 4 classes the run trained on"
    with pytest.raises(DatasetFormatError, match=fix + r" \(segpcl-fast evaluate RUN --set data.root=PATH") as err:
        evaluate(run, data__root=str(partial))
    assert "has 3 classes, but data.expected_classes is 4" in str(err.value)
    assert "expected_classes=3" not in str(err.value)
    resumed = make_config(run.joinpath("config.yaml"), [f"data.root={partial}", "run.resume=true"])
    with pytest.raises(DatasetFormatError, match=fix + r" \(--resume --set data.root=PATH\)"):
        train(resumed)
    assert evaluate(run)["task"] == 2  # the run's own copy still evaluates
