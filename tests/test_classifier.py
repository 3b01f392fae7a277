"""A trained run as a classifier: load_classifier / predict / export and the CLI's predict / export."""
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from segpcl_fast.api import make_config, train
from segpcl_fast.classifier import ClassifierError, load_classifier
from segpcl_fast.cli import main
from segpcl_fast.engine import checkpoint as ckpt
from segpcl_fast.engine.trainer import Trainer


@pytest.fixture(scope="module")
def run(tiny_model_name, tmp_path_factory):
    """A finished 2-task SeGP-CL run of the 2-layer random CLIP: (config, result, run dir)."""
    out = tmp_path_factory.mktemp("classifier") / "run"
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = make_config(model__name=tiny_model_name, model__pretrained=None, max_train_per_class=2,
                      max_test_per_class=3, num_tasks=2, epochs=1, optim__batch_size=32, dpgd__k_adv=2,
                      dpgd__k_seed=2, output_dir=str(out), progress=False, num_threads=1)
    result = train(cfg)
    torch.set_num_threads(threads)
    return cfg, result, out


def _images(n, size=40, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 7 * i, 3), dtype=np.uint8)) for i in range(n)]


def _accuracy_per_task(clf, trainer, t):
    """clf's accuracy (%) on each task j <= t's test images, predicting among its seen classes."""
    accs = []
    for j in range(t + 1):
        ds = trainer.scenario.test_dataset_task(j)
        images = torch.stack([ds[i][0] for i in range(len(ds))])
        labels = torch.tensor([ds[i][1] for i in range(len(ds))])
        accs.append(100.0 * float((clf.logits(images).argmax(-1) == labels).float().mean()))
    return accs


def test_classifier_reproduces_the_runs_accuracy_after_each_task(run):
    """Its argmax gives the run's accuracy matrix rows: the same model, text cache, prototypes and
    class order as the trainer's evaluation, after the last task and after task 1."""
    cfg, result, out = run
    trainer = Trainer(cfg)
    for task, clf in [(2, load_classifier(out)), (1, load_classifier(out, task=1))]:
        assert clf.task == task
        assert repr(clf) == (f"ContinualClassifier(model={cfg.model.name!r}, task={task}, "
                             f"classes={len(clf.class_names)}, beta=0.5, device=cpu)")
        n_seen = len(trainer.scenario.seen_classes(task - 1))
        assert clf.class_names == trainer.scenario.class_names[:n_seen]
        assert clf.beta == cfg.prototypes.beta == 0.5
        np.testing.assert_allclose(_accuracy_per_task(clf, trainer, task - 1),
                                   result.accuracy_matrix[task - 1][:task], atol=1e-9)


def test_predict_takes_paths_pil_images_and_tensors_alike(run, tmp_path):
    _, _, out = run
    clf = load_classifier(out)
    images = _images(3)
    paths = []
    for i, img in enumerate(images):
        paths.append(str(tmp_path / f"img{i}.png"))
        img.save(paths[-1])
    by_path = clf.predict(paths, topk=3, batch_size=2)
    by_pil = clf.predict(images, topk=3)
    by_tensor = clf.predict(clf.load_images(images), topk=3)
    for other in (by_path, by_tensor):  # other batch splits: the same classes, equal probabilities
        for a, b in zip(by_pil, other):
            assert [n for n, _ in a] == [n for n, _ in b]
            np.testing.assert_allclose([p for _, p in a], [p for _, p in b], atol=1e-6)
    logits = clf.logits(clf.load_images(images))
    probs = logits.softmax(-1)
    for row, top in zip(probs, by_pil):
        best = row.topk(3)
        assert [name for name, _ in top] == [clf.class_names[i] for i in best.indices.tolist()]
        np.testing.assert_allclose([p for _, p in top], best.values.tolist(), rtol=1e-6)
        assert top[0][1] >= top[1][1] >= top[2][1]
    assert len(clf.predict(images, topk=10_000)[0]) == len(clf.class_names)
    # one item alone (a path, a PIL image) is a list of one; a folder is its image files, sorted
    # (other batch splits: equal up to float order)
    def same(a, b):
        assert [[n for n, _ in top] for top in a] == [[n for n, _ in top] for top in b]
        np.testing.assert_allclose([[p for _, p in top] for top in a], [[p for _, p in top] for top in b], rtol=1e-5)
    same(clf.predict(paths[1], topk=3), [by_path[1]])
    same(clf.predict(images[2], topk=3), [by_pil[2]])
    (tmp_path / "notes.txt").write_text("not an image")
    same(clf.predict(tmp_path, topk=3), by_path)
    same(clf.predict([str(tmp_path)], topk=3), by_path)
    same(clf.predict([paths[2], tmp_path], topk=3), [by_path[2]] + by_path)


def test_predict_takes_bytes_paths_and_encoded_images_bytes(run, tmp_path):
    """Bytes without a NUL are a path (os.fsdecode, as os functions take them); bytes with one are an encoded
    image (an upload's contents), decoded as its file would be read."""
    import io
    import os
    _, _, out = run
    clf = load_classifier(out)
    images = _images(3)
    encoded = []
    for i, img in enumerate(images):
        img.save(tmp_path / f"img{i}.png")
        buffer = io.BytesIO()
        img.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    by_path = clf.predict(sorted(str(p) for p in tmp_path.glob("*.png")), topk=3)
    assert clf.image_items([os.fsencode(tmp_path / "img0.png"), bytearray(os.fsencode(tmp_path))]) == \
        [str(tmp_path / "img0.png")] + [str(tmp_path / f"img{i}.png") for i in range(3)]

    def same(a, b):  # other batch splits: equal up to float order
        assert [[n for n, _ in top] for top in a] == [[n for n, _ in top] for top in b]
        np.testing.assert_allclose([[p for _, p in top] for top in a], [[p for _, p in top] for top in b], rtol=1e-5)
    same(clf.predict(os.fsencode(tmp_path / "img1.png"), topk=3), [by_path[1]])
    same(clf.predict(os.fsencode(tmp_path), topk=3), by_path)
    by_bytes = clf.predict([encoded[0], bytearray(encoded[1]), encoded[2]], topk=3)
    same(by_bytes, by_path)
    same(clf.predict(encoded[2], topk=3), [by_bytes[2]])  # one item alone: a list of one
    damaged = encoded[1][:40]
    with pytest.raises(ClassifierError, match=r"40 bytes starting b'\\x89PNG.*cannot be decoded as an image"):
        clf.predict([encoded[0], damaged])
    got = clf.predict([encoded[0], damaged], topk=3, skip_unreadable=True)
    assert got[1] is None
    same(got[:1], by_bytes[:1])
    with pytest.raises(FileNotFoundError, match="nowhere.png does not exist"):
        clf.predict(b"nowhere.png")


def test_an_export_keeps_the_models_evaluation_geometry(run, tmp_path):
    """A model whose preprocess_cfg squashes (SigLIP, DFN) is exported and loaded back squashing."""
    import dataclasses
    _, _, out = run
    clf = load_classifier(out)
    clf.model.image_stats = dataclasses.replace(clf.model.image_stats, resize_mode="squash", interpolation="bilinear")
    back = load_classifier(clf.export(tmp_path / "model.pt"))
    assert back.model.image_stats == clf.model.image_stats
    assert tuple(back.transform.resize_crop.transforms[0].size) == (back.model.image_stats.size,) * 2  # squash


def test_export_is_plain_open_clip_and_loads_back_as_the_same_classifier(run, tmp_path):
    import open_clip
    _, _, out = run
    clf = load_classifier(out)
    path = clf.export(tmp_path / "model.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temp file left
    back = load_classifier(path)
    images = clf.load_images(_images(4))
    torch.testing.assert_close(back.logits(images), clf.logits(images), atol=1e-4, rtol=1e-5)
    assert back.class_names == clf.class_names and back.task == clf.task and back.beta == clf.beta
    # the CLIP path with nothing but open_clip and torch, as the module docstring shows
    saved = torch.load(path, weights_only=True)
    model = open_clip.create_model(saved["model_name"]).eval()
    model.load_state_dict(saved["state_dict"])
    with torch.no_grad():
        clip_logits = saved["logit_scale"] * F.normalize(model.encode_image(images), dim=-1) @ saved["text"].T
        _, emb = clf.model.encode_image(images)
    expected = clf.model.logit_scale() * F.normalize(emb, dim=-1) @ clf.text.T
    torch.testing.assert_close(clip_logits, expected, atol=1e-4, rtol=1e-5)


def test_cli_predict_and_export(run, tmp_path, capsys):
    _, _, out = run
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, img in enumerate(_images(2)):
        img.save(folder / f"p{i}.jpg")
    (folder / "notes.txt").write_text("not an image")
    assert main(["predict", str(out), str(folder), "--topk", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    clf = load_classifier(out)
    expected = clf.predict(sorted(str(p) for p in folder.glob("*.jpg")), topk=2)
    assert report["task"] == 2 and report["classes"] == len(clf.class_names)
    assert [r["image"] for r in report["predictions"]] == sorted(str(p) for p in folder.glob("*.jpg"))
    assert [[t["class"] for t in r["top"]] for r in report["predictions"]] == [[n for n, _ in e] for e in expected]
    assert main(["export", str(out), "-o", str(tmp_path / "m.pt"), "--task", "1"]) == 0
    assert "after task 1" in capsys.readouterr().out
    assert main(["predict", str(tmp_path / "m.pt"), str(folder / "p0.jpg")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(folder / "p0.jpg")) and "%)" in line
    assert main(["export", str(tmp_path / "m.pt"), "-o", str(tmp_path / "m2.pt")]) == 0  # an export exports again
    assert "after task 1" in capsys.readouterr().out
    first, again = load_classifier(tmp_path / "m.pt"), load_classifier(tmp_path / "m2.pt")
    images = first.load_images(_images(2))
    torch.testing.assert_close(again.logits(images), first.logits(images))
    assert main(["export", str(tmp_path / "m.pt"), "-o", str(tmp_path / "m3.pt"), "--task", "2"]) == 2
    assert "--task 2) selects a checkpoint of a run directory; " in capsys.readouterr().err
    assert main(["predict", str(out), str(tmp_path / "missing.jpg")]) == 2
    assert "missing.jpg does not exist" in capsys.readouterr().err
    assert main(["predict", str(out), str(folder), "--task", "7"]) == 2
    assert "no checkpoint of task 7; tasks with one: [1, 2]" in capsys.readouterr().err


def test_loading_leaves_the_callers_random_stream_alone(run, tmp_path):
    """A run, an export written from it and the export loaded back: none draws from the caller's CPU generator
    (merge_lora's new modules and open_clip's model were initialised from it before the weights replaced them)."""
    _, _, out = run
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    clf = load_classifier(out)
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(123)
    export = clf.export(tmp_path / "model.pt")
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(123)
    load_classifier(export)
    assert torch.equal(torch.rand(3), expected)


def test_bad_sources_and_images_give_one_clear_error(run, tmp_path):
    _, _, out = run
    with pytest.raises(FileNotFoundError, match="does not exist: give a run directory"):
        load_classifier(tmp_path / "nowhere")
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "config.yaml").write_text("run: {}\n")  # a run that finished no task
    with pytest.raises(ClassifierError, match="no checkpoint in"):
        load_classifier(tmp_path / "empty_run")
    (tmp_path / "pictures").mkdir()  # not a run at all
    with pytest.raises(ClassifierError, match="pictures is not a run directory .no config.yaml, no checkpoints/.: "
                                              "give train's output_dir, a checkpoint file or an exported classifier$"):
        load_classifier(tmp_path / "pictures")
    with pytest.raises(ClassifierError, match=f"not a run directory .*; runs below it: {tmp_path / 'empty_run'}$"):
        load_classifier(tmp_path)  # an ablation's folder: its runs lie below it
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ClassifierError, match="cannot be read .UnpicklingError: not a torch file") as e:
        load_classifier(tmp_path / "junk.pt")
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ClassifierError, match="neither a segpcl_fast checkpoint"):
        load_classifier(tmp_path / "other.pt")
    with pytest.raises(ClassifierError, match="one file"):
        load_classifier(ckpt.find_last_checkpoint(out), task=1)
    clf = load_classifier(out)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ClassifierError, match="broken.png cannot be read as an image"):
        clf.predict([str(tmp_path / "broken.png")])
    with pytest.raises(TypeError, match="image paths, folders, PIL images, .* or a .*got a list holding ndarray"):
        clf.predict([np.zeros((8, 8, 3))])
    size = clf.model.image_stats.size
    with pytest.raises(ValueError, match=rf"images of shape \(2, 3, {size + 1}, {size + 1}\), the model takes "
                                         rf"\(B, 3, {size}, {size}\)"):
        clf.logits(torch.zeros(2, 3, size + 1, size + 1))
    with pytest.raises(ValueError, match=r"predict\(\): images of shape \(3, "):
        clf.predict(torch.zeros(3, size, size))
    with pytest.raises(TypeError, match=r"logits\(\) takes a .* got list; predict\(\) takes paths"):
        clf.logits(_images(1))
    with pytest.raises(ValueError, match="topk must be a whole number >= 1, got 0"):
        clf.predict(_images(1), topk=0)


def test_checkpoint_without_class_names_needs_them_in_the_runs_order(run, tmp_path):
    """Checkpoints written before class names were stored: the run's results.json or class_names=
    supplies them, and names out of the run's order are refused (the stored reference text
    embeddings do not match)."""
    _, _, out = run
    state = torch.load(ckpt.find_last_checkpoint(out), weights_only=True)
    names = state.pop("class_names")
    old = tmp_path / "task_01.pt"
    torch.save(state, old)
    with pytest.raises(ClassifierError, match="predates stored class names and its run has no results.json "
                                              "holding them: pass class_names="):
        load_classifier(old)
    # inside a finished run's folder, its results.json has them (what the CLI relies on)
    import shutil
    (tmp_path / "old_run" / "checkpoints").mkdir(parents=True)
    shutil.copy(old, tmp_path / "old_run" / "checkpoints" / "task_01.pt")
    shutil.copy(out / "results.json", tmp_path / "old_run" / "results.json")
    assert load_classifier(tmp_path / "old_run").class_names == load_classifier(out).class_names
    assert load_classifier(old, class_names=names).class_names == names[:len(load_classifier(out).class_names)]
    with pytest.raises(ClassifierError, match="text embeddings of these class names differ"):
        load_classifier(old, class_names=names[1:] + names[:1])


def test_devices_damaged_checkpoints_and_folder_outputs_are_one_clear_error(run, tmp_path, capsys, zero_block):
    _, _, out = run
    with pytest.raises(ClassifierError, match="unknown device 'gpu'.*use cpu, cuda or cuda:N"):
        load_classifier(out, device="gpu")
    if not torch.cuda.is_available():  # not blamed on the weights, as it was
        with pytest.raises(ClassifierError, match=r"no CUDA device is available here; use device='cpu' \(--device cpu\)"):
            load_classifier(out, device="cuda")
    copy = tmp_path / "copy"
    (copy / "checkpoints").mkdir(parents=True)
    for name in ("task_00.pt", "task_01.pt"):  # tasks 1 and 2; task 2's copy cut in half
        data = (out / "checkpoints" / name).read_bytes()
        (copy / "checkpoints" / name).write_bytes(data[:len(data) // 2] if name == "task_01.pt" else data)
    with pytest.raises(ClassifierError, match=r"task_01.pt is damaged .*or use the one before it \(--task 1"):
        load_classifier(copy / "checkpoints" / "task_01.pt")
    (copy / "checkpoints" / "task_01.pt").write_bytes((out / "checkpoints" / "task_01.pt").read_bytes())
    zero_block(copy / "checkpoints" / "task_01.pt")  # whole, but a block in it changed
    with pytest.raises(ClassifierError, match=r"task_01.pt is damaged \(DamagedFileError: its bytes changed .*or use "
                                              r"the one before it \(--task 1"):
        load_classifier(copy / "checkpoints" / "task_01.pt")
    assert load_classifier(copy, task=1).task == 1
    load_classifier(out).export(tmp_path / "m.pt")
    zero_block(tmp_path / "m.pt")  # a damaged export: said so, with the fix (it was "not a checkpoint or export")
    with pytest.raises(ClassifierError, match=r"m.pt is damaged \(its bytes changed after it was written \(BadZipFile: "
                                              r"Bad CRC-32 for file 'data/\d+'\).*: copy it again, or export it again "
                                              r"from its run \(segpcl-fast export RUN_DIR -o m.pt\)$"):
        load_classifier(tmp_path / "m.pt")
    with pytest.raises(ClassifierError, match="is a folder: export writes one file"):
        load_classifier(out).export(tmp_path)
    (tmp_path / "file.txt").write_text("a file where a folder is needed")
    assert main(["export", str(out), "-o", str(tmp_path / "file.txt" / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("segpcl-fast: error:") and "file.txt" in err and "Traceback" not in err
    _images(1)[0].save(tmp_path / "a.png")
    assert main(["predict", str(out), str(tmp_path / "a.png"), "--device", "gpu"]) == 2
    assert "unknown device 'gpu'" in capsys.readouterr().err


def test_the_docstrings_plain_open_clip_snippet_runs_where_the_model_name_is_unknown(run, tmp_path):
    """The module docstring's snippet, run as written in a fresh interpreter that never registered the
    run's model config (as a user's script would be): it must rebuild the model from the export alone."""
    import subprocess
    import sys

    import segpcl_fast.classifier as module
    _, _, out = run
    clf = load_classifier(out)
    clf.export(tmp_path / "c100_model.pt")
    images = clf.load_images(_images(3))
    torch.save(images, tmp_path / "x.pt")
    doc = module.__doc__
    snippet = doc[doc.index("    ckpt = torch.load"):doc.index("\n\n(open_clip's")]
    script = "\n".join(["import json, tempfile", "from pathlib import Path", "import torch, open_clip",
                        "import torch.nn.functional as F", f"x = torch.load({str(tmp_path / 'x.pt')!r})",
                        *(line[4:] for line in snippet.splitlines()),
                        f"torch.save(logits.detach(), {str(tmp_path / 'logits.pt')!r})"])
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=300)
    assert clf.beta > 0  # both paths: the prototype path's hook is checked too
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), clf.logits(images), atol=1e-4, rtol=1e-5)


class _RunsCode:
    """Unpickling this runs `touch <marker>`: what a crafted .pt file does to an unsafe torch.load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_no_file_is_unpickled_with_code(run, tmp_path, capsys):
    """Checkpoints and exports load with weights_only=True: a crafted file is refused, its code never runs."""
    _, _, out = run
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    torch.save({"format": _RunsCode(marker), "lora": {}}, evil)
    with pytest.raises(ClassifierError, match=r"model.pt holds Python objects besides tensors .*GLOBAL posix.system"):
        load_classifier(evil)
    with pytest.raises(ckpt.CheckpointError, match="holds Python objects .*not a checkpoint segpcl_fast wrote"):
        ckpt.load_checkpoint(evil)
    _images(1)[0].save(tmp_path / "a.png")
    assert main(["predict", str(evil), str(tmp_path / "a.png")]) == 2
    assert "never unpickles code" in capsys.readouterr().err
    assert not marker.exists()
    # what the package writes loads under the same rule
    clf = load_classifier(out)
    assert torch.load(clf.export(tmp_path / "ok.pt"), weights_only=True)["class_names"] == clf.class_names


def _copy_run(out, dest):
    import shutil
    shutil.copytree(out, dest)
    return dest


def test_a_run_folder_whose_checkpoints_are_not_its_own_is_refused(run, tmp_path):
    """A checkpoint renamed or copied over another, or a config.yaml from another run: predict and
    export refuse it as evaluate and resume do, instead of serving another model under the run's name."""
    from segpcl_fast.api import evaluate
    _, _, out = run
    swapped = _copy_run(out, tmp_path / "swapped")
    (swapped / "checkpoints" / "task_00.pt").replace(swapped / "checkpoints" / "task_01.pt")
    with pytest.raises(ClassifierError, match=r"task_01.pt holds task 1 \(1-based\), not task 2 as its name says"):
        load_classifier(swapped)
    with pytest.raises(ckpt.CheckpointError, match="holds task 1 .1-based., not task 2"):
        evaluate(swapped)
    mixed = _copy_run(out, tmp_path / "mixed")
    text = (mixed / "config.yaml").read_text()
    assert "  lr: 0.001\n" in text
    (mixed / "config.yaml").write_text(text.replace("  lr: 0.001\n", "  lr: 0.002\n"))
    with pytest.raises(ClassifierError, match=r"optim.lr was 0.001, now 0.002 .*come from different runs .*"
                                              r"load_classifier \(predict, export\) needs a run directory"):
        load_classifier(mixed)
    with pytest.raises(ckpt.CheckpointError, match=r"come from different runs .*evaluate needs a run directory .*"
                                                   r"run.device, run.ops"):
        evaluate(mixed)
    alone = tmp_path / "task_01.pt"  # a checkpoint outside a run folder vouches for itself
    (mixed / "checkpoints" / "task_01.pt").replace(alone)
    assert load_classifier(alone).task == 2


def test_export_paths_are_checked_before_any_work_and_exports_are_no_checkpoints(run, tmp_path, capsys):
    _, _, out = run
    clf = load_classifier(out)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(ClassifierError, match="is in the checkpoints/ folder of the run .*write it elsewhere"):
        clf.export(out / "checkpoints" / "task_01.pt")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    with pytest.raises(ClassifierError, match="export needs a file path"):
        clf.export("")
    for own in ("config.yaml", "results.json", "accuracy_matrix.png"):  # the run's own files (it then failed to load)
        before = (out / own).read_bytes()
        with pytest.raises(ClassifierError, match=f"is the run's own {own} .*write it elsewhere, e.g. .*model.pt"):
            clf.export(out / own)
        assert (out / own).read_bytes() == before
    clf.export(tmp_path / "config.yaml").unlink()  # a file of that name where no run is: an export like any other
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ClassifierError, match="cannot write .*m.pt: .*a_file exists and is not a folder"):
        clf.export(tmp_path / "a_file" / "m.pt")
    export = clf.export(tmp_path / "model.pt")
    with pytest.raises(ckpt.CheckpointError, match="is an exported classifier .*evaluate needs the run's own"):
        ckpt.load_checkpoint(export, purpose="evaluate")
    image = tmp_path / "cat.png"
    _images(1)[0].save(image)
    assert main(["predict", str(image), str(image)]) == 2  # the run forgotten: the image came first
    assert "cat.png is an image: give the run first" in capsys.readouterr().err


def test_logits_and_predict_check_their_arguments(run):
    _, _, out = run
    clf = load_classifier(out)
    batch = clf.load_images(_images(2))
    n = len(clf.class_names)
    assert clf.logits(batch[:0]).shape == (0, n) and clf.predict(batch[:0]) == []
    torch.testing.assert_close(clf.logits(batch.double()), clf.logits(batch))  # any float dtype: fp32 in
    with pytest.raises(TypeError, match="a torch.uint8 batch; the model takes float images through clf.transform"):
        clf.logits((batch * 50).to(torch.uint8))
    for kwargs in ({"topk": 2.5}, {"topk": True}, {"batch_size": 0}):
        with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be a whole number >= 1"):
            clf.predict(batch, **kwargs)
    with pytest.raises(TypeError, match=r"predict\(\) got a numpy array: pass PIL images"):
        clf.predict(np.zeros((2, 8, 8, 3), dtype=np.uint8))
    one_by_one, together = clf.predict(batch, batch_size=1, topk=3), clf.predict(batch, topk=3)
    assert [[c for c, _ in row] for row in one_by_one] == [[c for c, _ in row] for row in together]
    assert [p for row in one_by_one for _, p in row] == pytest.approx([p for row in together for _, p in row], abs=1e-5)


def test_skip_unreadable_keeps_going_past_a_bad_file(run, tmp_path, capsys, caplog):
    _, _, out = run
    clf = load_classifier(out)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(_images(3)):
        image.save(folder / f"{i}.png")
    (folder / "1.png").write_bytes(b"\x89PNG cut short")  # the middle one, in a batch with the others
    with pytest.raises(ClassifierError, match="1.png cannot be read as an image"):
        clf.predict(folder)
    good = clf.predict([folder / "0.png", folder / "2.png"], topk=2)
    with caplog.at_level("WARNING", logger="segpcl_fast.classifier"):
        got = clf.predict(folder, topk=2, skip_unreadable=True, batch_size=2)
    assert got[1] is None
    assert [[c for c, _ in row] for row in (got[0], got[2])] == [[c for c, _ in row] for row in good]
    assert [p for row in (got[0], got[2]) for _, p in row] == pytest.approx([p for row in good for _, p in row], abs=1e-5)
    assert any("1.png cannot be read" in r.getMessage() for r in caplog.records)
    assert main(["predict", str(out), str(folder), "--skip-unreadable", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["predictions"]
    assert [r["top"] is None for r in rows] == [False, True, False]
    assert main(["predict", str(out), str(folder)]) == 2


def test_load_images_takes_what_predict_takes(run, tmp_path):
    """A single path was iterated character by character, a folder was 'not found', [] raised torch's
    stack error and a PIL image alone was 'not iterable'."""
    _, _, out = run
    clf = load_classifier(out)
    images = _images(2)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(images):
        img.save(folder / f"{i}.png")
    expected = clf.load_images(images)
    torch.testing.assert_close(clf.load_images(str(folder / "1.png")), expected[1:])
    torch.testing.assert_close(clf.load_images(folder / "0.png"), expected[:1])
    torch.testing.assert_close(clf.load_images([str(folder)]), expected)
    torch.testing.assert_close(clf.load_images(images[1]), expected[1:])
    size = clf.model.image_stats.size
    assert clf.load_images([]).shape == (0, 3, size, size)
    with pytest.raises(TypeError, match=r"load_images\(\) got a numpy array"):
        clf.load_images(np.zeros((8, 8, 3), dtype=np.uint8))


def test_an_unnormalised_batch_is_warned_about_once(run):
    """ToTensor() output ([0, 1], not CLIP-normalised) classified silently badly."""
    import warnings

    _, _, out = run
    clf = load_classifier(out)
    batch = clf.load_images(_images(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clf.logits(batch)  # normalised: no warning
    raw = torch.rand(2, 3, *batch.shape[2:])
    with pytest.warns(UserWarning, match=r"every value in \[0, 1\]: it looks like ToTensor\(\) output"):
        clf.predict(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clf.logits(raw)  # once per classifier


def test_arguments_of_the_wrong_kind_are_one_clear_error(run):
    _, _, out = run
    for task in ("2", 2.0, True, 0):
        with pytest.raises(ClassifierError, match="task must be a whole number >= 1"):
            load_classifier(out, task=task)
    with pytest.raises(ClassifierError, match="class_names must be a list of names, got one string"):
        load_classifier(out, class_names="abc")
    with pytest.raises(ClassifierError, match="cannot override 'data.root=/x'"):
        load_classifier(out, overrides=["data.root=/x"])
    with pytest.raises(ClassifierError, match="holds no values"):
        load_classifier(out, device="meta")
    clf = load_classifier(out, overrides="model.cache_dir=/nowhere")  # random weights: no cache read; one string
    assert clf.task == 2


def test_an_export_refuses_class_names_and_weight_locations(run, tmp_path):
    _, _, out = run
    path = load_classifier(out).export(tmp_path / "m.pt")
    with pytest.raises(ClassifierError, match="is an export: it holds its weights and class names, so class_names"):
        load_classifier(path, class_names=["x"] * 10)
    with pytest.raises(ClassifierError, match="so overrides"):
        load_classifier(path, overrides=["model.cache_dir=/x"])


def test_a_checkpoint_of_a_newer_version_names_both_versions(run, tmp_path):
    from segpcl_fast import __version__
    _, _, out = run
    state = torch.load(ckpt.find_last_checkpoint(out), weights_only=True)
    assert state["segpcl_fast_version"] == __version__  # recorded in every task checkpoint
    state["config"]["run"]["a_key_of_the_future"] = 1
    state["segpcl_fast_version"] = "9.0.0"
    torch.save(state, tmp_path / "future.pt")
    with pytest.raises(ClassifierError, match=rf"written by segpcl_fast 9.0.0 .* this one \({__version__}\).*"
                                              r"a_key_of_the_future.*load it with the version that wrote it"):
        load_classifier(tmp_path / "future.pt")


def test_a_run_whose_weights_file_moved_loads_with_its_new_place(tiny_model_name, tmp_path, capsys, monkeypatch):
    """predict and export could not be told where a run's weights file lies now (evaluate could)."""
    import open_clip

    weights = tmp_path / "w" / "tiny.pt"
    weights.parent.mkdir()
    torch.manual_seed(3)
    torch.save(open_clip.create_model(tiny_model_name).state_dict(), weights)
    cfg = make_config(model__name=tiny_model_name, model__pretrained=str(weights), max_train_per_class=2,
                      max_test_per_class=2, num_tasks=2, epochs=1, optim__batch_size=32, dpgd__k_adv=1,
                      dpgd__k_seed=1, output_dir=str(tmp_path / "run"), progress=False, num_threads=1)
    train(cfg)
    before = load_classifier(tmp_path / "run")
    image = tmp_path / "a.png"
    _images(1)[0].save(image)
    moved = weights.rename(tmp_path / "tiny_moved.pt")
    with pytest.raises(ClassifierError, match=r"do not load here .*does not exist.*--set model.pretrained=/new/path"):
        load_classifier(tmp_path / "run")
    after = load_classifier(tmp_path / "run", overrides=[f"model.pretrained={moved}"])
    torch.testing.assert_close(after.logits(after.load_images(image)), before.logits(before.load_images(image)))
    torch.save(open_clip.create_model(tiny_model_name).state_dict(), tmp_path / "other.pt")  # other weights
    with pytest.raises(ClassifierError, match="pretrained text embeddings of these class names differ"):
        load_classifier(tmp_path / "run", overrides=[f"model.pretrained={tmp_path / 'other.pt'}"])
    assert main(["predict", str(tmp_path / "run"), str(image), "--set", f"model.pretrained={moved}"]) == 0
    assert str(image) in capsys.readouterr().out
    assert main(["export", str(tmp_path / "run"), "-o", str(tmp_path / "m.pt"), "-s", f"model.pretrained={moved}"]) == 0
    # a mistyped image path fails before any model loads
    import segpcl_fast.classifier as classifier_module
    monkeypatch.setattr(classifier_module, "load_classifier", lambda *a, **k: pytest.fail("loaded the model first"))
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "typo.png")]) == 2
    assert "typo.png does not exist" in capsys.readouterr().err


def test_a_sixteen_bit_pil_image_is_read_as_its_file_is(run, tmp_path):
    """predict() / load_images on a PIL image take the datasets' 8-bit scaling of 16-bit grayscale, as
    on its path (PIL's convert('RGB') clipped it near white)."""
    import numpy as np
    from PIL import Image
    clf = load_classifier(run[2])
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        torch.testing.assert_close(clf.load_images([im]), clf.load_images([tmp_path / "g16.png"]), rtol=0, atol=0)


def test_an_export_whose_model_name_no_longer_resolves_loads_from_the_config_it_carries(run, tmp_path):
    """A `local-dir:` model whose folder moved (or a config registered only in the exporting process):
    the export carries its model config, so it still loads and predicts as before."""
    clf = load_classifier(run[2])
    path = clf.export(tmp_path / "model.pt")
    state = torch.load(path, weights_only=True)
    state["model_name"] = f"local-dir:{tmp_path / 'moved_away'}"
    torch.save(state, tmp_path / "moved.pt")
    x = torch.randn(3, 3, clf.model.image_stats.size, clf.model.image_stats.size)
    moved = load_classifier(tmp_path / "moved.pt")
    torch.testing.assert_close(moved.logits(x), load_classifier(path).logits(x), rtol=0, atol=0)
    # written again, it keeps its own name and config (it was written under the alias it loaded by: a review)
    again = torch.load(moved.export(tmp_path / "again.pt"), weights_only=True)
    assert again["model_name"] == state["model_name"] and again["model_config"] == state["model_config"]
    torch.testing.assert_close(load_classifier(tmp_path / "again.pt").logits(x), moved.logits(x), rtol=0, atol=0)
    del state["model_config"]  # without one: the name's own error
    torch.save(state, tmp_path / "bare.pt")
    from segpcl_fast.model.clip import ModelLoadError
    with pytest.raises(ModelLoadError, match="moved_away"):
        load_classifier(tmp_path / "bare.pt")


def test_a_bf16_runs_export_holds_fp32_weights_at_the_values_it_used(tiny_model_name, tmp_path):
    """run.precision=bf16 stores the image tower's frozen GEMM weights in bf16 (model/frozen_cast.py);
    the classifier rebuilt from the run does too, and its export is fp32 throughout, as open_clip's own
    (the merged weights computed in fp32 from the bf16 values the run used), loading back to the same
    classifier."""
    cfg = make_config(model__name=tiny_model_name, model__pretrained=None, max_train_per_class=2,
                      max_test_per_class=2, num_tasks=1, epochs=1, dpgd__k_adv=2, dpgd__k_seed=2,
                      output_dir=str(tmp_path / "run"), progress=False, num_threads=1, plots=False,
                      run__precision="bf16")
    train(cfg)
    clf = load_classifier(tmp_path / "run")
    assert clf.model.frozen_storage == {"visual": torch.bfloat16}
    saved = torch.load(clf.export(tmp_path / "model.pt"), weights_only=True)
    assert {t.dtype for t in saved["state_dict"].values() if t.is_floating_point()} == {torch.float32}
    assert clf.model.frozen_storage == {"visual": torch.bfloat16}  # the export merged a copy
    w = saved["state_dict"]["visual.transformer.resblocks.0.attn.out_proj.weight"]  # no LoRA there: W itself
    assert torch.equal(w, w.bfloat16().float())
    back = load_classifier(tmp_path / "model.pt")
    images = clf.load_images(_images(3))
    torch.testing.assert_close(back.logits(images), clf.logits(images), atol=0.5, rtol=0.02)


def test_an_unavailable_device_of_any_kind_is_refused_before_anything_loads(run, monkeypatch):
    """mps / xpu on a machine without them: asked of torch itself (they failed later, as if the weights had moved)."""
    from segpcl_fast import classifier
    _, _, out = run
    real_empty = torch.empty

    def empty(*args, device=None, **kwargs):
        if device is not None and torch.device(device).type == "mps":
            raise RuntimeError("PyTorch is not linked with support for mps devices")
        return real_empty(*args, device=device, **kwargs)
    monkeypatch.setattr(classifier.torch, "empty", empty)
    monkeypatch.setattr(classifier, "_from_checkpoint", lambda *a, **k: pytest.fail("loaded the run"))
    with pytest.raises(ClassifierError, match=r"device 'mps' is not available here \(PyTorch is not linked with "
                                              r"support for mps devices\); use device='cpu'"):
        load_classifier(out, device="mps")


def test_a_run_trained_without_checkpoints_says_so(tiny_model_name, tmp_path):
    """run.checkpoint=false keeps no weights: evaluate / predict / export say that plainly, not 'finished no task'."""
    out = tmp_path / "nockpt"
    train(make_config(model__name=tiny_model_name, model__pretrained=None, max_train_per_class=1, max_test_per_class=1,
                      num_tasks=2, epochs=1, optim__batch_size=32, dpgd__k_adv=1, dpgd__k_seed=1, output_dir=str(out),
                      progress=False, num_threads=1, plots=False, run__checkpoint=False, eval__fwt=False))
    with pytest.raises(ClassifierError, match="was trained with run.checkpoint=false, so its weights were not saved"):
        load_classifier(out)
    from segpcl_fast.api import evaluate
    with pytest.raises(FileNotFoundError, match="was trained with run.checkpoint=false, so its weights were not saved"):
        evaluate(out)
    # a finished run copied without its .pt files (its config keeps checkpoints): they are missing, not unmade
    (out / "config.yaml").write_text((out / "config.yaml").read_text().replace("checkpoint: false", "checkpoint: true"))
    with pytest.raises(ClassifierError, match="results.json records a run that finished: its checkpoints .* are "
                                              "missing"):
        load_classifier(out)
    with pytest.raises(FileNotFoundError, match="results.json records a run that finished"):
        evaluate(out)
    (out / "results.json").unlink()
    with pytest.raises(ClassifierError, match="no checkpoint in .*: the run finished no task$"):
        load_classifier(out)


def test_loading_and_predicting_keep_the_callers_default_dtype_logging_and_cuda_seed(run, tmp_path, monkeypatch):
    """A caller's torch.set_default_dtype (float64, bfloat16) built the model in that dtype: a run directory was
    refused as "another image tower", an export failed at predict, bf16 pixels shifted the logits. Loading also
    left a root logging handler (open_clip's module-level logging.info) and the run's seed queued for CUDA.
    Each was a review's finding: all are the caller's again after a load, and the logits are float32's."""
    import logging
    _, _, out = run
    images = _images(3)
    clf = load_classifier(out)
    expected = clf.logits(clf.load_images(images))
    exported = clf.export(tmp_path / "m.pt")
    for dtype in (torch.float64, torch.bfloat16):
        torch.set_default_dtype(dtype)
        try:
            for source, atol in ((out, 0.0), (exported, 1e-4)):  # an export: merged weights, rounding apart
                loaded = load_classifier(source)
                assert torch.get_default_dtype() == dtype
                got = loaded.logits(loaded.load_images(images))
                assert got.dtype == torch.float32
                torch.testing.assert_close(got, expected, atol=atol, rtol=0)
        finally:
            torch.set_default_dtype(torch.float32)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # a caller that configured no logging (pytest has)
    torch.manual_seed(123)
    tracker = getattr(torch.cuda, "_lazy_seed_tracker", None)
    queued = lambda: [c.cell_contents for c in tracker.get_calls()[1][0].__closure__]  # noqa: E731
    load_classifier(out)
    load_classifier(exported)
    assert logging.getLogger().handlers == []  # so the caller's logging.basicConfig still works
    if tracker is not None and tracker.get_calls()[1] is not None:  # torch's private queue, where it has one
        assert queued() == [123]


def test_float32_blocks_overlapping_in_threads_give_the_callers_dtype_back_and_warnings_still_print(monkeypatch,
                                                                                                  capsys):
    """The default dtype is the process's: two overlapping float32 blocks (threads) gave back float32 when the first
    one to start ended last (the caller's float64 lost); and the root guard against logging.basicConfig silenced
    every thread's warnings while a model loaded (a NullHandler). Both from a review of this change."""
    import logging
    import threading

    from segpcl_fast.model.clip import float32_default, open_clip_call
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with float32_default():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def second():
        a_in.wait(5)
        with float32_default():
            b_in.set()
            a_out.wait(5)
            seen["inside after the first ended"] = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert seen == {"inside after the first ended": torch.float32} and torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(torch.float32)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # a caller that configured no logging
    with open_clip_call():
        logging.getLogger("elsewhere").warning("a warning while a model loads")
        logging.info("open_clip's module-level info")  # would call logging.basicConfig without the guard
    assert "a warning while a model loads" in capsys.readouterr().err
    assert logging.getLogger().handlers == []


def test_deployment_review_files_names_and_warnings(run, tmp_path, capsys):
    """A review's findings on what load_classifier / predict / export take: each named plainly."""
    import warnings

    import segpcl_fast
    _, _, out = run
    assert segpcl_fast.ClassifierError is ClassifierError  # importable from the package, as load_classifier is
    clf = load_classifier(out)
    exported = clf.export(tmp_path / "m.pt")
    # an export cut short (a torch file is a zip: its central directory gone) is damaged, not "not ours"
    (tmp_path / "cut.pt").write_bytes(exported.read_bytes()[:100000])
    with pytest.raises(ClassifierError, match="cut.pt is damaged .*central directory.*copy it again, or export it "
                                              "again"):
        load_classifier(tmp_path / "cut.pt")
    # an export in a newer format names it and the fix
    state = torch.load(exported, weights_only=True)
    state["format"] = "segpcl_fast.classifier/2"
    torch.save(state, tmp_path / "newer.pt")
    with pytest.raises(ClassifierError, match="an export in the format 'segpcl_fast.classifier/2'.*upgrade"):
        load_classifier(tmp_path / "newer.pt")
    # checkpoints/last, the pointer file, loads what it names (the run's last checkpoint)
    via_pointer = load_classifier(out / "checkpoints" / "last")
    assert via_pointer.task == clf.task and torch.equal(via_pointer.prototypes, clf.prototypes)
    # a checkpoint without its task number is not the trainer's
    ckpt_state = torch.load(out / "checkpoints" / "task_01.pt", weights_only=True)
    del ckpt_state["task"]
    torch.save(ckpt_state, tmp_path / "notask.pt")
    with pytest.raises(ClassifierError, match="stores no config, learner state or task"):
        load_classifier(tmp_path / "notask.pt")
    # export refuses a name load_classifier would take for an image
    assert main(["export", str(out), "-o", str(tmp_path / "model.png")]) == 2
    assert f"model.png is named as an image: export writes a torch file, e.g. {tmp_path / 'model.pt'}" in \
        capsys.readouterr().err
    # folders give predict what ImageFolder reads, tif and gif too
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, image in zip(("a.tiff", "b.gif", "c.TIF"), _images(3)):
        image.save(folder / name)
    assert len(clf.predict(folder)) == 3
    # image_items (README) pairs predict's results with what they are for
    assert clf.image_items([folder, "x.jpg"]) == [str(folder / n) for n in ("a.tiff", "b.gif", "c.TIF")] + ["x.jpg"]
    # a low-contrast image predict() normalised itself is not taken for ToTensor output; a caller's batch still is
    flat = Image.fromarray(np.full((40, 40, 3), 150, dtype=np.uint8))
    assert clf.load_images(flat).min() >= 0 and clf.load_images(flat).max() <= 1
    fresh = load_classifier(out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.predict(flat)
        assert not caught
        fresh.predict(torch.rand(1, 3, *clf.load_images(flat).shape[2:]))
    assert [str(w.message).startswith("predict() got a batch with every value in [0, 1]") for w in caught] == [True]
    assert caught[0].filename == __file__  # the caller's line
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_classifier(out).logits(torch.rand(1, 3, *clf.load_images(flat).shape[2:]))
    assert [w.filename for w in caught] == [__file__]  # logits' too (a decorator's frame took its place)


def test_cli_export_peft_writes_an_adapter_peft_loads_onto_the_plain_model(run, tmp_path, capsys):
    """export --peft: the run's adapters as a peft adapter directory; peft's PeftModel.from_pretrained over the
    plain open_clip model with the run's base weights computes the run's image embeddings."""
    peft = pytest.importorskip("peft")
    import copy

    import open_clip

    from segpcl_fast.model.peft_adapter import unload_lora
    _, _, out = run
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    assert main(["export", str(out), "--peft", "-o", str(taken)]) == 2  # checked before the model loads
    assert "new (or empty) directory" in capsys.readouterr().err
    assert main(["export", str(out), "--peft", "-o", str(tmp_path / "adapter"), "--task", "2"]) == 0
    said = capsys.readouterr().out
    assert "peft.PeftModel.from_pretrained" in said
    clf = load_classifier(out, task=2)
    # open_clip knows the tests' model config: it is suggested too, as for ViT-B-16; not for the package's own
    # config or bundled weights, which open_clip alone does not resolve (a review's finding)
    assert f", or open_clip.create_model('{clf.model.name}')" in said
    from segpcl_fast.cli import peft_load_hint
    assert "open_clip.create_model('ViT-B-16', pretrained='openai')" in peft_load_hint("ViT-B-16", "openai", "a")
    assert "manual_seed" not in peft_load_hint("ViT-B-16", "openai", "a", weights_seed=3)  # pretrained: no seed
    for name, pretrained in (("segpcl-tiny", "segpcl-world"), ("segpcl-tiny", None)):
        assert "open_clip" not in peft_load_hint(name, pretrained, "a")
    # the run's base weights are random (model.pretrained none): drawn after the run's seed, which the hint and
    # the adapter's record name; following the hint gives the run's base, bit for bit (before, it named no seed)
    seed = clf.model.weights_seed
    assert isinstance(seed, int) and f"torch.manual_seed({seed}) (the run's random base weights), then" in said
    record = json.loads((tmp_path / "adapter" / "segpcl_base_model.json").read_text())
    assert record["weights_seed"] == seed and record["load_with"].startswith(f"torch.manual_seed({seed})")
    torch.manual_seed(seed)
    from segpcl_fast import load_model
    hinted = load_model(clf.model.name, pretrained=None).clip
    base = unload_lora(copy.deepcopy(clf.model)).clip.state_dict()  # the run's pretrained (here random) weights
    plain = open_clip.create_model(clf.model.name).eval()
    plain.load_state_dict(base)
    images = clf.load_images(_images(3))
    with torch.no_grad():
        _, emb = clf.model.encode_image(images)
        assert not torch.allclose(plain.encode_image(images), emb, atol=1e-3)  # the adapters do change it
        loaded = peft.PeftModel.from_pretrained(plain, str(tmp_path / "adapter"))  # wraps `plain` in place
        torch.testing.assert_close(loaded.base_model.model.encode_image(images), emb, atol=1e-5, rtol=1e-5)
        assert all(torch.equal(hinted.state_dict()[k], v) for k, v in base.items())
        loaded = peft.PeftModel.from_pretrained(hinted, str(tmp_path / "adapter"))
        torch.testing.assert_close(loaded.base_model.model.encode_image(images), emb, atol=1e-5, rtol=1e-5)
    for bad in (".", tmp_path / "taken"):  # one ClassifierError for a path that cannot take it, as export's
        with pytest.raises(ClassifierError, match="names no new folder|new \\(or empty\\) directory"):
            clf.save_peft_adapter(bad)
    exported = clf.export(tmp_path / "m.pt")
    with pytest.raises(ClassifierError, match="no LoRA adapters"):  # an export has them merged in
        load_classifier(exported).save_peft_adapter(tmp_path / "from_export")
    assert not (tmp_path / "from_export").exists()


def test_a_folder_of_class_folders_names_them_rather_than_holding_no_images(tmp_path):
    """predict DIR reads DIR's own images (not recursive): an ImageFolder split (test/<class>/*.jpg) given whole was
    'holds no image files' and nothing more; the error now says it holds folders and names one to pass."""
    from segpcl_fast.classifier import image_paths
    split = tmp_path / "test"
    for name in ("cat", "dog"):
        (split / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(split / name / "0.png")
    with pytest.raises(FileNotFoundError, match=r"only folders \(cat, dog\).*pass those folders instead, e\.g\. "
                                                + re.escape(str(split / "cat"))):
        image_paths([split])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no image files \([^)]*\)$"):
        image_paths([tmp_path / "empty"])
    assert image_paths([split / "cat"]) == [str(split / "cat" / "0.png")]


@pytest.mark.parametrize("change,hint", [("run.device=cuda", "the device is device= (predict --device)"),
                                         ("eval.batch_size=8", "the batch is predict's batch_size= (--batch-size)")])
def test_an_override_with_its_own_option_names_that_option(tmp_path, change, hint):
    """predict RUN IMG --set run.device=cuda was refused naming only the weights keys: the device (and the batch)
    have their own options, which the error now names. Checked before any file is read."""
    with pytest.raises(ClassifierError, match=re.escape(f"load_classifier (--set) cannot override '{change}'")) as e:
        load_classifier(tmp_path / "absent", overrides=[change])
    assert str(e.value).endswith(hint), str(e.value)
