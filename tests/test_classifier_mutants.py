"""Tests added by a mutation audit of segpcl_fast/classifier.py (no trained run needed): the
classifier's transform uses the model's own image statistics, and its logits / predictions are the
dual path l(x, c) = s cos(v, u_c) + beta s cos(r, p_c) with class names in logit-column order."""
import numpy as np
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
