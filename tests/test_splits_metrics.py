"""Few-shot splits, rare-class metrics and the classifiers' input stems."""

import numpy as np
import pytest

from synthaug.data.splits import class_index, few_shot_split, write_images
from synthaug.evaluation.metrics import multilabel_rare_metrics, rare_class_metrics


class _Labelled:
    classes = ["a", "b", "c"]

    def __init__(self, n_per=50):
        self.targets = np.repeat(np.arange(3), n_per)
        self.data = np.random.default_rng(0).integers(0, 256, (len(self.targets), 8, 8), dtype=np.uint8)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.data[i], int(self.targets[i])


def test_few_shot_split_sizes_determinism_and_errors():
    ds = _Labelled()
    a = few_shot_split(ds, "b", shots=5, per_class=20, seed=3)
    assert a.rare_class == 1 and len(a.rare) == 5 and set(a.rare) <= set(a.train)
    counts = np.bincount(ds.targets[a.train], minlength=3)
    assert counts.tolist() == [20, 5, 20]
    b = few_shot_split(ds, 1, shots=5, per_class=20, seed=3)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.rare, b.rare)
    c = few_shot_split(ds, "B", shots=5, per_class=20, seed=4)
    assert not np.array_equal(a.rare, c.rare)
    assert len(few_shot_split(ds, "b", shots=5, per_class=None).train) == 105
    with pytest.raises(ValueError, match="not one of"):
        class_index(ds, "z")
    with pytest.raises(ValueError, match="cannot draw 60"):
        few_shot_split(ds, "b", shots=60, per_class=20)


def test_write_images_round_trips(tmp_path):
    from PIL import Image

    ds = _Labelled()
    paths = write_images(ds, [3, 7], tmp_path, prefix="x")
    assert [p.name for p in paths] == ["x_000003.png", "x_000007.png"]
    assert np.array_equal(np.asarray(Image.open(paths[1])), ds.data[7])


def test_rare_class_metrics_known_answer():
    y = np.array([0, 1, 1, 1, 2, 2])
    p = np.array([0, 1, 0, 2, 1, 2])
    m = rare_class_metrics(y, p, rare=1)
    assert m["rare_recall"] == pytest.approx(1 / 3) and m["rare_precision"] == pytest.approx(1 / 2)
    assert m["rare_f1"] == pytest.approx(0.4) and m["accuracy"] == pytest.approx(3 / 6) and m["rare_support"] == 3
    never = rare_class_metrics(y, np.zeros_like(y), rare=1)
    assert never["rare_precision"] == 0.0 and never["rare_f1"] == 0.0
    scores = np.eye(3)[y] * 0.9 + 0.05  # perfect ranking
    assert rare_class_metrics(y, p, 1, scores)["rare_average_precision"] == pytest.approx(1.0)


def test_multilabel_metrics_known_answer():
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    s = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.7], [0.1, 0.6]])
    m = multilabel_rare_metrics(y, s, label=1)
    assert m["rare_recall"] == 1.0 and m["rare_precision"] == pytest.approx(2 / 3) and m["rare_support"] == 2


@pytest.mark.parametrize("size,channels", [(28, 1), (64, 3), (128, 1), (256, 3)])
def test_resnet18_stem_follows_the_image_size(size, channels):
    """Small images get the stride-1 3×3 stem (no max-pool); large ones torchvision's ImageNet stem,
    which shrinks 4× before the first block: the last feature map is size/8 against size/32 (rounded up)."""
    import torch

    from synthaug.classifier import SMALL_INPUT_MAX, build_classifier

    net = build_classifier("resnet18", in_channels=channels, num_classes=3, image_size=size).eval()
    small = size <= SMALL_INPUT_MAX
    assert net.conv1.in_channels == channels
    assert (net.conv1.kernel_size, net.conv1.stride) == (((3, 3), (1, 1)) if small else ((7, 7), (2, 2)))
    assert isinstance(net.maxpool, torch.nn.Identity) == small
    features = []
    net.layer4.register_forward_hook(lambda module, inputs, output: features.append(output.shape[-1]))
    with torch.no_grad():
        assert net(torch.zeros(2, channels, size, size)).shape == (2, 3)
    assert features == [-(-size // 8) if small else -(-size // 32)]  # stride-2 convolutions round up
    # no image size given: the small-input stem, as before
    assert build_classifier("resnet18", in_channels=channels, num_classes=3).conv1.stride == (1, 1)
