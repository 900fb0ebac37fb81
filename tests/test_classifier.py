"""The classifier module: soft targets and synthetic weights in training, and the reference
classifier's file (round trip, refusal of anything that is not one)."""

import pickle

import numpy as np
import pytest
import torch

from synthaug.classifier import ReferenceClassifier, train_classifier, train_reference_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _digits(n=600):
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images[:n] * (255 / 16)).round().astype(np.uint8)[:, :, :, None]  # 8×8 gray
    return images, d.target[:n], [str(i) for i in range(10)]


def test_a_reference_classifier_learns_real_digits_and_round_trips_through_its_file(tmp_path):
    images, labels, classes = _digits()
    ref = train_reference_classifier(images[:500], labels[:500], classes, steps=150, trained_on="digits 0-499", augment=False)  # a flip changes a digit
    p = ref.probabilities(images[500:])
    assert p.shape == (100, 10) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert (p.argmax(1) == labels[500:]).mean() > 0.7
    path = ref.save(tmp_path / "ref.pt")
    back = ReferenceClassifier.load(path)
    assert back.classes == classes and back.trained_on == "digits 0-499" and back.sha256 == ref.sha256
    assert np.allclose(back.probabilities(images[500:]), p, atol=1e-5)
    # other sizes and channel counts are brought to its input
    rgb = np.repeat(np.kron(images[500:510], np.ones((1, 2, 2, 1), np.uint8)), 3, axis=3)  # 16×16 RGB
    assert back.probabilities(rgb).shape == (10, 10)
    assert back.class_index("3") == 3 and back.class_index(4) == 4
    with pytest.raises(ValueError, match="not one of the reference classifier's classes"):
        back.class_index("cat")


def test_a_file_that_is_not_a_reference_classifier_is_refused_without_running_it(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('ran code')",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"format": "synthaug-classifier", "x": Boom()}))
    with pytest.raises(ValueError, match="is not a synthaug reference classifier"):
        ReferenceClassifier.load(evil)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no 'synthaug-classifier' format key"):
        ReferenceClassifier.load(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        ReferenceClassifier.load(tmp_path / "missing.pt")


def test_soft_targets_and_synthetic_weights_set_the_loss():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))  # no dropout or batch norm: train = eval
    x = torch.randn(4, 1, 8, 8)
    soft = torch.tensor([[0.7, 0.3, 0.0], [0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.float32)
    synthetic = torch.tensor([True, False, False, True])

    def loss_of(batch, **kw):
        m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
        m.load_state_dict(model.state_dict())
        with torch.no_grad():
            logits = m(x)
        out = train_classifier(m, [batch], steps=1, lr=0.0, **kw)
        return out, logits

    out, logits = loss_of((x, soft))
    expected = -(soft * torch.log_softmax(logits, 1)).sum(1).mean()
    assert out["final_loss"] == pytest.approx(float(expected), rel=1e-4)
    out, logits = loss_of((x, soft, synthetic), synthetic_weight=0.25)
    per = -(soft * torch.log_softmax(logits, 1)).sum(1)
    w = torch.where(synthetic, 0.25, 1.0)
    assert out["final_loss"] == pytest.approx(float((per * w).sum() / w.sum()), rel=1e-4)
    assert out["synthetic_samples"] == 2
    with pytest.raises(ValueError, match="synthetic_weight must be >= 0"):
        train_classifier(model, [(x, soft)], steps=1, synthetic_weight=-1)
