"""Tests added by a mutation audit of segpcl_fast/classifier.py (no trained run needed): the
classifier's transform uses the model's own image statistics, and its logits / predictions are the
dual path l(x, c) = s cos(v, u_c) + beta s cos(r, p_c) with class names in logit-column order."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from segpcl_fast.classifier import ContinualClassifier
from segpcl_fast.model.clip import ImageStats, load_model


def _classifier(tiny_model_name, beta=0.5, stats=None):
    model = load_model(tiny_model_name, pretrained=None)
    if stats is not None:
        model.image_stats = stats
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(3, 32, generator=g), dim=-1)
    protos = torch.randn(3, 48, generator=g)
    return ContinualClassifier(model=model, class_names=["ant", "bee", "cat"], text=text, prototypes=protos,
                               beta=beta, task=1)


def test_transform_uses_the_models_image_stats(tiny_model_name):
    stats = ImageStats(size=32, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.125))
    clf = _classifier(tiny_model_name, stats=stats)
    img = Image.fromarray(np.full((32, 32, 3), 255, np.uint8))
    x = clf.transform(img)
    want = (1.0 - torch.tensor(stats.mean)) / torch.tensor(stats.std)
    torch.testing.assert_close(x[:, 0, 0], want)


def test_logits_and_predict_are_the_dual_path(tiny_model_name):
    clf = _classifier(tiny_model_name, beta=0.5)
    images = [Image.fromarray(np.random.RandomState(k).randint(0, 256, (40, 36, 3), dtype=np.uint8)) for k in range(4)]
    batch = clf.load_images(images)
    with torch.no_grad():
        raw, emb = clf.model.encode_image(batch)
        s = float(clf.model.logit_scale())
    want = s * F.normalize(emb, dim=-1) @ clf.text.T + 0.5 * s * F.normalize(raw, dim=-1) @ F.normalize(
        clf.prototypes, dim=-1).T
    torch.testing.assert_close(clf.logits(batch), want, rtol=1e-5, atol=1e-4)
    top = clf.predict(images, topk=3)
    probs = want.softmax(dim=-1)
    for i, row in enumerate(top):
        order = probs[i].argsort(descending=True).tolist()
        assert [name for name, _ in row] == [clf.class_names[j] for j in order]
        np.testing.assert_allclose([p for _, p in row], probs[i, order].tolist(), rtol=1e-4, atol=1e-6)


def test_checkpoint_classifier_uses_the_runs_text_cache_not_the_reference(tiny_model_name, tmp_path):
    """After training, u_S (the cached student text embeddings) is what the CLIP path uses; the
    pretrained reference embeddings (ref_text) are only a consistency check."""
    from segpcl_fast.api import make_config, train
    from segpcl_fast.classifier import load_classifier
    from segpcl_fast.engine import checkpoint as ckpt
    cfg = make_config(model__name=tiny_model_name, model__pretrained=None, max_train_per_class=2,
                      max_test_per_class=1, num_tasks=2, epochs=1, optim__batch_size=32, dpgd__k_adv=1,
                      dpgd__k_seed=1, output_dir=str(tmp_path / "run"), progress=False, num_threads=1)
    train(cfg)
    state = torch.load(ckpt.find_last_checkpoint(tmp_path / "run"), map_location="cpu", weights_only=True)
    clf = load_classifier(tmp_path / "run")
    n = len(clf.class_names)
    assert torch.equal(clf.text, state["learner"]["text_cache"][:n])
    assert not torch.equal(clf.text, state["learner"]["ref_text"][:n])


def test_one_encoded_image_alone_is_one_image_as_bytes_or_bytearray(tiny_model_name):
    """An upload's contents passed alone (not in a list) is one image, whether bytes or bytearray: the same
    batch as the PIL image it encodes (a bytearray alone was iterated as ints)."""
    import io
    clf = _classifier(tiny_model_name)
    img = Image.fromarray(np.random.RandomState(3).randint(0, 256, (40, 36, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    encoded = buffer.getvalue()
    want = clf.load_images([img])
    for item in (encoded, bytearray(encoded)):
        assert len(clf.image_items(item)) == 1
        torch.testing.assert_close(clf.load_images(item), want)
        assert [n for n, _ in clf.predict(item, topk=3)[0]] == [n for n, _ in clf.predict([img], topk=3)[0]]


def test_logits_of_an_empty_batch_have_the_dtype_and_width_of_a_full_ones(tiny_model_name):
    clf = _classifier(tiny_model_name)
    full = clf.logits(clf.load_images([Image.fromarray(np.zeros((32, 32, 3), np.uint8))]))
    empty = clf.logits(clf.load_images([]))
    assert empty.shape == (0, full.shape[1]) and empty.dtype == full.dtype == torch.float32
    assert clf.predict([]) == []


def test_an_export_of_a_newer_format_names_both_formats_and_versions(tmp_path):
    """load_classifier refuses an export whose format is a later version of its own (segpcl_fast.classifier/N)
    with the versions to use, not as a checkpoint missing its config."""
    from segpcl_fast import __version__
    from segpcl_fast.classifier import EXPORT_FORMAT, ClassifierError, load_classifier
    newer = EXPORT_FORMAT.rsplit("/", 1)[0] + "/99"
    torch.save({"format": newer, "segpcl_fast_version": "9.0.0"}, tmp_path / "future.pt")
    with pytest.raises(ClassifierError, match=rf"an export in the format '{newer}' \(written by segpcl_fast 9\.0\.0\)"
                                              rf".*this segpcl_fast \({__version__}\) reads '{EXPORT_FORMAT}'"):
        load_classifier(tmp_path / "future.pt")
    torch.save({"format": "someone.else/2", "lora": {}}, tmp_path / "other.pt")  # not our export family: no such claim
    with pytest.raises(ClassifierError) as e:
        load_classifier(tmp_path / "other.pt")
    assert "an export in the format" not in str(e.value)


def test_a_missing_task_names_the_tasks_that_have_a_checkpoint_one_based(tmp_path):
    """task=N loads checkpoints/task_{N-1:02d}.pt: a missing one lists the tasks (1-based) whose files exist."""
    from segpcl_fast.classifier import ClassifierError, load_classifier
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("run: {}\n")
    for name in ("task_00.pt", "task_02.pt", "notes.pt"):
        (run / "checkpoints" / name).write_bytes(b"")
    with pytest.raises(ClassifierError, match=r"has no checkpoint of task 2; tasks with one: \[1, 3\]"):
        load_classifier(run, task=2)


@pytest.mark.parametrize("side, keep", [(512, 0.99), (64, 0.5), (8, 0.5)])
def test_a_torch_file_cut_short_outside_a_run_is_called_damaged(tmp_path, side, keep):
    """An export (any torch file outside a run's checkpoints/) that lost its end is "damaged", to copy or export
    again, not "not a segpcl_fast checkpoint or export": a 1 MB file, a 17 KB one (torch.load fails on that one
    with an OSError, not the others' "central directory" error) and a 2 KB one."""
    from segpcl_fast.classifier import ClassifierError, load_classifier
    torch.save({"format": "segpcl_fast.classifier/1", "state_dict": {"w": torch.randn(side, side)}}, tmp_path / "model.pt")
    data = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "model.pt").write_bytes(data[:int(len(data) * keep)])  # a copy stopped before its end
    with pytest.raises(ClassifierError, match=r"model\.pt is damaged \(.*export it again from its run"):
        load_classifier(tmp_path / "model.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all")  # not a zip: no claim of damage
    with pytest.raises(ClassifierError, match="cannot be read .* not a segpcl_fast checkpoint or export"):
        load_classifier(tmp_path / "junk.pt")


def test_a_checkpoint_without_its_task_is_refused_as_not_the_trainers(tmp_path):
    from segpcl_fast.classifier import ClassifierError, load_classifier
    torch.save({"config": {}, "learner": {}, "lora": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(ClassifierError, match=r"stores no config, learner state or task; it was not written by"):
        load_classifier(tmp_path / "ckpt.pt")


def test_a_checkpoint_whose_probe_image_embeddings_differ_is_refused(tiny_model_name, tmp_path):
    """A checkpoint records the pretrained image tower's embeddings of fixed probe images (ref_image): another
    image tower under the same name is refused, not silently used."""
    from segpcl_fast.api import make_config, train
    from segpcl_fast.classifier import ClassifierError, load_classifier
    from segpcl_fast.engine import checkpoint as ckpt
    cfg = make_config(model__name=tiny_model_name, model__pretrained=None, max_train_per_class=2,
                      max_test_per_class=1, num_tasks=2, epochs=1, optim__batch_size=32, dpgd__k_adv=1,
                      dpgd__k_seed=1, output_dir=str(tmp_path / "run"), progress=False, num_threads=1)
    train(cfg)
    path = ckpt.find_last_checkpoint(tmp_path / "run")
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["learner"].get("ref_image") is not None
    load_classifier(path)  # its own tower: loads
    state["learner"]["ref_image"] = state["learner"]["ref_image"].flip(0) + 1.0
    torch.save(state, tmp_path / "other_tower.pt")
    with pytest.raises(ClassifierError, match="pretrained image embeddings of the probe images differ"):
        load_classifier(tmp_path / "other_tower.pt")
