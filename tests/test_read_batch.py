"""SyntheticCache.read_batch: the batch read path (one transaction, one copy per image into one
array, CRC on every record) returns exactly what per-record ``get`` returns, for every encoding,
size and label kind, and names the damaged record of a batch."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synthaug import CorruptRecordError, SyntheticCache
from synthaug.cache.codec import HEADER_SIZE, Encoding, SoftLabel, decode_batch, encode_record
from tests.helpers.damage import flip_record_byte


def _flip(path, seq, offset):
    flip_record_byte(path, seq, offset, mask=0x01)  # one bit


def _same(batch, records):
    assert batch.seqs == [r.seq for r in records]
    assert [type(x) for x in batch.labels] == [type(r.label) for r in records] and batch.labels == [r.label for r in records]
    for i, r in enumerate(records):
        assert np.array_equal(batch.images[i], r.image) and batch.meta(i) == r.meta


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    encoding=st.sampled_from(["raw", "png", "jpeg", "webp"]),
    size=st.sampled_from([(5, 7, 1), (28, 28, 1), (160, 160, 3)]),  # 160×160×3 takes the copy-then-CRC path
    order=st.permutations(range(6)),
)
def test_read_batch_matches_get_for_any_encoding_size_and_order(tmp_path_factory, encoding, size, order):
    h, w, c = size
    rng = np.random.default_rng(h)
    cache = SyntheticCache(tmp_path_factory.mktemp("c") / "c", encoding=encoding)
    images = rng.integers(0, 256, (6, h, w, c), dtype=np.uint8)
    labels = [3, (1, 2), SoftLabel({4: 0.75, 0: 0.25}), 0, 7, (5,)]
    cache.append(images, labels, {"model": "m", "seed": 1})
    batch = cache.read_batch(order)
    assert isinstance(batch.images, np.ndarray) and batch.images.shape == (6, h, w, c) and batch.images.flags.writeable
    _same(batch, [cache.get(q) for q in order])
    if encoding == "raw":
        assert np.array_equal(batch.images, images[list(order)])
    assert [r.label for r in cache.get_many(order)] == [labels[q] for q in order]
    lean = cache.read_batch(order, with_meta=False)
    assert lean.meta_bytes is None and lean.labels == batch.labels and np.array_equal(lean.images, batch.images)
    with pytest.raises(ValueError, match="with_meta=False"):
        lean.records()
    cache.close()


def test_read_batch_into_a_reused_array_and_mixed_shapes(tmp_path):
    cache = SyntheticCache(tmp_path / "c")
    a = np.full((3, 8, 8, 1), 7, np.uint8)
    cache.append(a, [0, 1, 2])
    out = np.zeros((2, 8, 8, 1), np.uint8)
    batch = cache.read_batch([2, 0], out=out)
    assert batch.images is out and (out == 7).all() and batch.labels == [2, 0]
    with pytest.raises(ValueError, match="out must be"):
        cache.read_batch([0, 1, 2], out=out)
    # a cache holds one image size; values of two shapes (decoded together elsewhere) come back as a list
    values = [encode_record(np.full((4, 5, 3), 9, np.uint8), 5, b"{}", Encoding.raw), encode_record(a[0], 1, b"{}", Encoding.png)]
    mixed = decode_batch(values, [10, 11])
    assert isinstance(mixed.images, list) and [im.shape for im in mixed.images] == [(4, 5, 3), (8, 8, 1)]
    assert mixed.labels == [5, 1] and (mixed.images[0] == 9).all() and (mixed.images[1] == 7).all()
    assert len(cache.read_batch([])) == 0
    with pytest.raises(KeyError, match="seq=9"):
        cache.read_batch([0, 9])  # evicted or never written
    cache.close()


@pytest.mark.parametrize("side,channels", [(16, 1), (160, 3)])
@pytest.mark.parametrize("where", ["label", "image", "last image byte", "header"])
def test_read_batch_names_the_damaged_record(tmp_path, side, channels, where):
    path = tmp_path / "c"
    cache = SyntheticCache(path)
    cache.append(np.zeros((4, side, side, channels), np.uint8), [0, 1, 2, 3], {"model": "m"})
    n = len(cache._env().env.begin(buffers=False).get((2).to_bytes(8, "big"), db=cache._env().dbs["records"]))
    cache.close()
    offset = {"label": HEADER_SIZE, "image": n - side * side * channels // 2, "last image byte": n - 1, "header": 10}[where]
    _flip(path, 2, offset)
    cache = SyntheticCache(path)
    with pytest.raises(CorruptRecordError, match=r"seq=2\b"):
        cache.read_batch([0, 1, 2, 3])
    with pytest.raises(CorruptRecordError, match=r"seq=2\b"):
        cache.get_many([3, 2])
    assert cache.read_batch([0, 1, 3]).labels == [0, 1, 3]
    cache.close()


# --------------------------------------------- MixedDataset: a batch's synthetic images in one step
class _PilReal:
    """A torchvision-like real dataset of PIL images (mode L or RGB)."""

    classes = [str(i) for i in range(10)]

    def __init__(self, channels):
        self.channels = channels

    def __len__(self):
        return 4

    def __getitem__(self, i):
        from PIL import Image

        return Image.fromarray(np.full((8, 8, 3) if self.channels == 3 else (8, 8), i, np.uint8)), i


@pytest.mark.parametrize("real_channels,record_channels", [(1, 1), (3, 3), (3, 1)])
@pytest.mark.parametrize("kind", ["to_tensor", "normalize", "two_normalize", "synthetic_transform", "other_transform"])
def test_mixed_dataset_batch_conversion_equals_the_transform_on_pil_images(tmp_path, real_channels, record_channels, kind):
    """ToTensor (+ Normalize) is applied to the synthetic images of a batch at once, without a
    PIL round trip; the result is bit-identical to the transform on each image's PIL form, and
    any other transform (or a record that needs converting) takes the per-image path."""
    import torch
    from PIL import Image
    from torchvision import transforms as T

    from synthaug.mixing import MixedDataset
    from synthaug.mixing.index import SyntheticIndex

    c = real_channels
    tf = {
        "to_tensor": T.ToTensor(),
        "normalize": T.Compose([T.ToTensor(), T.Normalize((0.3,) * c, (0.7,) * c)]),
        "two_normalize": T.Compose([T.ToTensor(), T.Normalize((0.3,), (0.7,)), T.Normalize((0.1,) * c, (0.2,) * c)]),
        "synthetic_transform": T.Compose([T.ToTensor(), T.Normalize((0.3,) * c, (0.7,) * c)]),
        "other_transform": T.Compose([T.ToTensor(), T.Lambda(lambda x: x * 2)]),
    }[kind]
    syn_tf = T.RandomHorizontalFlip(p=1.0) if kind == "synthetic_transform" else None
    cache = SyntheticCache(tmp_path / "c")
    images = np.random.default_rng(c).integers(0, 256, (6, 8, 8, record_channels), dtype=np.uint8)
    cache.append(images, [1, 2, 3, 4, 5, 6])
    ds = MixedDataset(_PilReal(c), cache, transform=tf, synthetic_transform=syn_tf)
    order = [4, 0, 2]
    items = ds.__getitems__([1, *[SyntheticIndex(q) for q in order], 3])
    fast = ds.__dict__["_batch_to_tensor"][1]
    assert (fast is not None) == (kind in ("to_tensor", "normalize", "two_normalize"))
    for (x, y), q in zip(items[1:4], order):
        pil = Image.fromarray(images[q][:, :, 0] if record_channels == 1 else images[q])
        pil = pil.convert("RGB") if c == 3 else pil
        expected = tf(syn_tf(pil) if syn_tf is not None else pil)
        assert x.dtype == expected.dtype and x.shape == expected.shape and torch.equal(x, expected) and y == q + 1
    assert torch.equal(items[0][0], tf(_PilReal(c)[1][0])) and items[4][1] == 3


@pytest.mark.parametrize("side,channels", [(16, 1), (160, 3)])
def test_verify_once_checks_each_record_on_its_first_read(tmp_path, side, channels):
    """verify="once": a damaged record is caught on its first read; a record checked before is
    not checked again while its stored CRC is the same (damage after the check goes unseen until
    ``cache verify``); a relabelled record (new CRC) is checked anew. "always" catches all."""
    path = tmp_path / "c"
    cache = SyntheticCache(path)
    cache.append(np.zeros((4, side, side, channels), np.uint8), [0, 1, 2, 3])
    cache.close()
    _flip(path, 3, HEADER_SIZE + 4 + 3)  # record 3 damaged before any read (a byte after its label)
    once = SyntheticCache(path, verify="once")
    always = SyntheticCache(path)
    with pytest.raises(CorruptRecordError, match=r"seq=3\b"):
        once.read_batch([0, 3])
    assert once.read_batch([0, 1, 2]).labels == [0, 1, 2]  # checked now
    once.close()
    always.close()  # (py-lmdb opens an environment once per process: closed while another handle writes)
    _flip(path, 1, HEADER_SIZE + 4 + 3)  # damaged after its check
    assert once.read_batch([1]).labels == [1]  # not checked again
    with pytest.raises(CorruptRecordError, match=r"seq=1\b"):
        always.read_batch([1])
    import pickle

    with pytest.raises(CorruptRecordError, match=r"seq=1\b"):  # a copy (a DataLoader worker) checks for itself
        pickle.loads(pickle.dumps(once)).read_batch([1])
    with pytest.raises(ValueError, match="verify must be"):
        SyntheticCache(path, verify="never")
    once.close()
    always.close()


def test_mixed_dataset_follows_a_replaced_transform(tmp_path):
    """Setting ``dataset.transform`` later (train/eval switch) takes effect for synthetic items."""
    import torch
    from torchvision import transforms as T

    from synthaug.mixing import MixedDataset
    from synthaug.mixing.index import SyntheticIndex

    cache = SyntheticCache(tmp_path / "c")
    cache.append(np.full((2, 8, 8, 1), 51, np.uint8), [1, 2])
    ds = MixedDataset(_PilReal(1), cache, transform=T.ToTensor())
    assert torch.allclose(ds.__getitems__([SyntheticIndex(0)])[0][0], torch.full((1, 8, 8), 0.2))
    ds.transform = T.Compose([T.ToTensor(), T.Normalize((0.2,), (0.5,))])
    assert torch.allclose(ds.__getitems__([SyntheticIndex(1)])[0][0], torch.zeros((1, 8, 8)), atol=1e-6)
    ds.transform = T.Compose([T.ToTensor(), T.Lambda(lambda x: x + 1)])
    assert torch.allclose(ds.__getitems__([SyntheticIndex(0)])[0][0], torch.full((1, 8, 8), 1.2))
