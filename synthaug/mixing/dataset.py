"""``MixedDataset``: a real dataset and a synthetic cache behind one index space.

Real items are addressed by plain ``int`` indices into the real dataset, synthetic ones by
:class:`~synthaug.mixing.index.SyntheticIndex` (a cache sequence number). A
:class:`~synthaug.mixing.sampler.RatioBatchSampler` yields batches of both; the DataLoader hands
each batch to :meth:`MixedDataset.__getitems__`, which reads the batch's synthetic records in one
cache read transaction.
"""

from __future__ import annotations

import errno
import os
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from synthaug.cache.codec import Label, Record, RecordBatch, SoftLabel
from synthaug.cache.store import SyntheticCache
from synthaug.errors import CorruptRecordError
from synthaug.imaging import pil_channels
from synthaug.mixing.columns import ColumnDataset
from synthaug.mixing.index import SyntheticIndex

__all__ = ["MixedDataset", "ON_CORRUPT"]

ON_CORRUPT = ("replace", "raise")
_COUNTER_SLOTS = 64  # rows of the shared counter table: main process + one per DataLoader worker
_COUNTERS = ("corrupt", "missing", "replaced")
_REPLACE_SEARCH = 4096  # older records looked at for a replacement of a bad one
_SCAN_WINDOW = 256
_ACK_SLOTS = 8192  # ring of (ticket, items read) for the batches a sampler has in flight


def _find_attr(dataset: Any, name: str) -> Any:
    """``dataset.<name>``, looking through wrappers that keep the wrapped one in ``.dataset``
    (``torch.utils.data.Subset`` and the like)."""
    seen = 0
    while dataset is not None and seen < 8:
        if hasattr(dataset, name):
            return getattr(dataset, name)
        dataset = getattr(dataset, "dataset", None)
        seen += 1
    return None


class _ImageForm:
    """The form in which the real dataset returns images, and the conversion of a synthetic
    uint8 H×W×C record image into it."""

    def __init__(self, sample: Any) -> None:
        from PIL import Image

        self.kind = "other"
        self.size: Optional[Tuple[int, int]] = None  # (height, width)
        self.channels: Optional[int] = None
        self.mode: Optional[str] = None
        if isinstance(sample, Image.Image):
            self.kind, self.mode = "pil", sample.mode
            self.size = (sample.size[1], sample.size[0])
            self.channels = pil_channels(sample.mode)
        elif isinstance(sample, np.ndarray) and sample.dtype == np.uint8:
            if sample.ndim == 2:
                self.kind, self.layout, self.channels, self.size = "numpy", "HW", 1, sample.shape
            elif sample.ndim == 3 and sample.shape[2] in (1, 3):
                self.kind, self.layout, self.channels, self.size = "numpy", "HWC", sample.shape[2], sample.shape[:2]
        elif isinstance(sample, torch.Tensor) and sample.dtype == torch.uint8:
            if sample.ndim == 2:
                self.kind, self.layout, self.channels, self.size = "tensor", "HW", 1, tuple(sample.shape)
            elif sample.ndim == 3 and sample.shape[0] in (1, 3):
                self.kind, self.layout, self.channels = "tensor", "CHW", int(sample.shape[0])
                self.size = tuple(sample.shape[1:])
        if self.size is not None:
            self.size = (int(self.size[0]), int(self.size[1]))
        self.description = {
            "pil": f"PIL images (mode {self.mode!r})",
            "numpy": f"uint8 numpy arrays ({getattr(self, 'layout', '')})",
            "tensor": f"uint8 tensors ({getattr(self, 'layout', '')})",
        }.get(self.kind, f"{type(sample).__name__} objects" + (f" of dtype {sample.dtype}" if hasattr(sample, "dtype") else ""))

    def takes(self, channels: int) -> bool:
        """Whether a record image with ``channels`` becomes a PIL image of that many channels
        (``"L"`` or ``"RGB"``) unchanged, so that converting it to a tensor directly gives what
        the transform gives on the PIL image."""
        return self.kind == "other" or (self.kind == "pil" and self.mode == ("L" if channels == 1 else "RGB"))

    def convert(self, image: np.ndarray) -> Any:
        """A record image (uint8 H×W×C, C = 1 or 3) in the real dataset's form; a PIL image
        (mode ``"L"`` or ``"RGB"``) when that form is unknown (``kind == "other"``)."""
        if self.kind == "pil" or self.kind == "other":
            from PIL import Image

            pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
            if self.kind == "pil" and pil.mode != self.mode:
                pil = pil.convert(self.mode)
            return pil
        image = _match_channels(image, self.channels)
        if self.kind == "numpy":
            return image[:, :, 0] if self.layout == "HW" else image
        tensor = torch.from_numpy(image)
        return tensor[:, :, 0] if self.layout == "HW" else tensor.permute(2, 0, 1)


class _BatchToTensor:
    """A transform that is torchvision's ``ToTensor`` followed by any ``Normalize`` steps
    (alone or in a ``Compose``), applied to a whole batch of uint8 N×H×W×C record images at
    once: one tensor conversion, one division by 255, one subtraction and division per
    ``Normalize``, on the batch instead of per PIL image. The arithmetic is the same, element
    for element, as the transform's on each image's PIL form (mode ``"L"``/``"RGB"``), so the
    result is bit-identical (tested); any other transform is applied per image as given."""

    def __init__(self, norms: List[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.norms = norms

    @classmethod
    def of(cls, transform: Optional[Callable]) -> Optional["_BatchToTensor"]:
        try:
            from torchvision import transforms as T
        except ImportError:  # pragma: no cover - torchvision is a dependency
            return None
        steps = transform.transforms if type(transform) is T.Compose else [transform]
        if not steps or type(steps[0]) is not T.ToTensor:
            return None
        norms = []
        for step in steps[1:]:
            if type(step) is not T.Normalize:
                return None
            dtype = torch.get_default_dtype()
            mean, std = torch.as_tensor(step.mean, dtype=dtype), torch.as_tensor(step.std, dtype=dtype)
            if (std == 0).any() or mean.ndim > 1 or std.ndim > 1:
                return None  # the transform's own error, per image
            norms.append((mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)))
        return cls(norms)

    def __call__(self, images: np.ndarray) -> List[torch.Tensor]:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(torch.get_default_dtype()).div_(255)
        for mean, std in self.norms:
            x.sub_(mean).div_(std)
        return list(x.unbind(0))


def _match_channels(image: np.ndarray, channels: int) -> np.ndarray:
    if image.shape[2] == channels:
        return image
    if channels == 3:
        return np.repeat(image, 3, axis=2)
    from PIL import Image

    return np.asarray(Image.fromarray(image).convert("L"))[:, :, None]


class _TargetForm:
    """The form of the real dataset's targets: single-label (int, numpy integer, 0-d tensor) or
    multi-hot (1-D tensor / array / list)."""

    def __init__(self, sample: Any) -> None:
        self.multi_label = False
        self.width: Optional[int] = None
        if isinstance(sample, torch.Tensor):
            if sample.ndim == 0:
                self.kind, self.dtype = "tensor0", sample.dtype
            elif sample.ndim == 1:
                self.kind, self.dtype, self.multi_label, self.width = "tensor", sample.dtype, True, int(sample.shape[0])
            else:
                raise ValueError(f"real_dataset targets are {sample.ndim}-D tensors; MixedDataset supports class indices and 1-D multi-hot targets")
        elif isinstance(sample, np.ndarray):
            if sample.ndim == 0:
                self.kind, self.dtype = "numpy0", sample.dtype
            elif sample.ndim == 1:
                self.kind, self.dtype, self.multi_label, self.width = "numpy", sample.dtype, True, int(sample.shape[0])
            else:
                raise ValueError(f"real_dataset targets are {sample.ndim}-D arrays; MixedDataset supports class indices and 1-D multi-hot targets")
        elif isinstance(sample, np.integer):
            self.kind, self.dtype = "npscalar", type(sample)
        elif isinstance(sample, int) and not isinstance(sample, bool):
            self.kind, self.dtype = "int", int
        elif isinstance(sample, (list, tuple)) and sample and all(isinstance(v, (int, float, np.number)) for v in sample):
            self.kind, self.dtype, self.multi_label, self.width = "list", type(sample[0]), True, len(sample)
        else:
            raise ValueError(
                f"real_dataset returns targets of type {type(sample).__name__} ({sample!r}); MixedDataset maps "
                "synthetic labels to class indices (int, numpy integer, 0-d tensor) or to multi-hot vectors "
                "(1-D tensor, array or list). Wrap the real dataset so it returns one of these."
            )

    def make(self, label: Union[int, Tuple[int, ...]]) -> Any:
        """The real-dataset form of a mapped label (an int, or a tuple of ints for multi-hot)."""
        if not self.multi_label:
            if self.kind == "int":
                return label
            if self.kind == "tensor0":
                return torch.tensor(label, dtype=self.dtype)
            if self.kind == "numpy0":
                return np.array(label, dtype=self.dtype)
            return self.dtype(label)
        idx = list(label)
        if self.kind == "tensor":
            out = torch.zeros(self.width, dtype=self.dtype)
            out[idx] = 1
            return out
        if self.kind == "numpy":
            out = np.zeros(self.width, dtype=self.dtype)
            out[idx] = 1
            return out
        one = self.dtype(1)
        zero = self.dtype(0)
        members = set(idx)
        return [one if i in members else zero for i in range(self.width)]


class MixedDataset(Dataset):
    """A real dataset and a :class:`~synthaug.cache.store.SyntheticCache` as one map-style dataset.

    Args:
        real_dataset: a map-style dataset of ``(image, target)`` pairs (torchvision-like). Its
            images may be PIL images, uint8 numpy arrays (H×W or H×W×C) or uint8 tensors (H×W or
            C×H×W); its targets class indices (int, numpy integer, 0-d tensor) or multi-hot
            vectors (1-D tensor/array/list, e.g. ChestX-ray14).
        cache: the synthetic cache (a :class:`SyntheticCache`, or the path of an existing one,
            opened writable so a sampler can record its cursor and hold; read-only when it lies
            on a read-only file system, where no writer can run either).
        transform: applied to the image of every item, real and synthetic, as the last step.
        synthetic_transform: applied to synthetic images only, before ``transform``; it receives
            the image in the real dataset's form (a PIL image, or a uint8 array/tensor laid out as
            the real ones). Required when the real dataset returns anything else (e.g. float
            tensors after its own transform): it then receives a PIL image (mode ``"L"`` or
            ``"RGB"``) and must return what the real dataset returns — typically the real
            dataset's own transform. Also required when the cache's image size differs from the
            real images' (e.g. a ``Resize``).
        target_transform: applied to the target of every item, real and synthetic.
        soft_targets: every target becomes a float32 tensor of class probabilities over the real
            label space: a real item's class one-hot, a synthetic record's soft label
            (``{class: weight}``, e.g. from inter-class translation) as its weights. Needed for a
            cache that holds soft labels (a single-label real dataset with a known number of
            classes), so the items of a batch collate; train with a cross-entropy that takes
            probabilities (``torch.nn.functional.cross_entropy`` does).
        image_column, label_column: for a real dataset whose items are dicts of columns (a Hugging
            Face ``datasets.Dataset``): the columns that hold the image and the class index; the
            dataset is read through :class:`~synthaug.mixing.columns.ColumnDataset`, and a
            ``ClassLabel`` label column's names are its classes (records map to them by name).
        mark_synthetic: items become ``(image, target, is_synthetic)``, so a training loop can
            weight the loss of synthetic items (``synthaug.classifier.train_classifier``'s
            ``synthetic_weight``).
        on_corrupt: what a synthetic record that fails its CRC or decode when its batch is read,
            or is gone (deleted behind the sampler's back: the sampler's hold keeps writers from
            evicting it), does: ``"replace"`` (default) serves instead the nearest *older*
            readable record with the same stored label from the same cache shard — one the
            sampler has already served, so no fresh record is used up and served twice — counts
            it in :meth:`stats` and warns once per process; when there is none (within 4,096
            records), or the label is unknown (an index not made by a sampler, of an unreadable
            record), it raises :class:`~synthaug.errors.CorruptRecordError` rather than serve
            another class. ``"raise"`` raises :class:`~synthaug.errors.CorruptRecordError` (or
            ``KeyError`` for a record that is gone).

    Items: ``mixed[i]`` for an ``int`` ``i`` is exactly ``real_dataset[i]`` (then ``transform``
    and ``target_transform`` if given); ``mixed[SyntheticIndex(seq)]`` is the cache record
    ``seq`` as ``(image, target)`` in the same form. Synthetic labels are mapped into the real
    dataset's label space: by class name when the cache has ``label_names`` and the real dataset a
    ``class_to_idx``, otherwise by index. Label names stored after this dataset was built (a
    generation worker stores its generator's when it starts) are read as soon as they appear:
    while the cache has none, each read of records checks again. A multi-label record (a tuple of
    labels) becomes the real dataset's multi-hot form. A soft label ``{class: weight}`` keeps its
    weights over the mapped classes (two classes that map to the same real class add up); it needs
    ``soft_targets=True``. ``len(mixed)`` is ``len(real_dataset)``.

    Raises:
        FileNotFoundError: ``cache`` is a path with no cache (creating one is the writer's job:
            ``SyntheticCache(path)``, ``synthaug generate`` or a generation worker).
        ValueError: an empty real dataset; items that are not ``(image, target)`` pairs; a cache
            label outside the real label space (or a label name the real dataset lacks); cache
            images of another size, or real images of an unknown form, without
            ``synthetic_transform``; an unknown ``on_corrupt``.
    """

    def __init__(
        self,
        real_dataset: Any,
        cache: Union[SyntheticCache, str, os.PathLike],
        *,
        transform: Optional[Callable] = None,
        synthetic_transform: Optional[Callable] = None,
        target_transform: Optional[Callable] = None,
        on_corrupt: str = "replace",
        soft_targets: bool = False,
        mark_synthetic: bool = False,
        image_column: Optional[str] = None,
        label_column: Optional[str] = None,
    ) -> None:
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        if not isinstance(cache, SyntheticCache):
            if not isinstance(cache, (str, os.PathLike)):
                raise ValueError(f"cache must be a SyntheticCache or a path, got {type(cache).__name__}")
            if not os.path.isfile(os.path.join(cache, "data.mdb")):
                raise FileNotFoundError(
                    f"no synthetic cache at {cache} (no data.mdb): check the path. A reader does not create a "
                    "cache; fill one first with `synthaug generate`, start a GenerationWorker on it, or create it "
                    "with synthaug.SyntheticCache(path)"
                )
            try:
                cache = SyntheticCache(cache)  # writable, so the sampler can record its cursor
            except PermissionError as exc:
                if exc.errno != errno.EROFS:
                    raise
                cache = SyntheticCache(cache, readonly=True)  # a read-only file system: nobody writes it
        try:
            n = len(real_dataset)
        except TypeError:
            raise ValueError(
                f"real_dataset must be a map-style dataset with a length; {type(real_dataset).__name__} has none"
            ) from None
        if n == 0:
            raise ValueError("real_dataset is empty; MixedDataset needs at least one real item (the epoch is defined by the real data)")
        if (image_column is None) != (label_column is None):
            raise ValueError("pass both image_column and label_column (the columns of a dataset whose items are dicts), or neither")
        if image_column is not None:
            real_dataset = ColumnDataset(real_dataset, image_column, label_column)
        self.real_dataset = real_dataset
        self.cache = cache
        self.transform = transform
        self.synthetic_transform = synthetic_transform
        self.target_transform = target_transform
        self.on_corrupt = on_corrupt
        self.soft_targets = bool(soft_targets)
        self.mark_synthetic = bool(mark_synthetic)

        sample = real_dataset[0]
        if isinstance(sample, dict):
            raise ValueError(
                f"real_dataset items are dicts (columns {list(sample)}), e.g. a Hugging Face datasets.Dataset; pass "
                "image_column= and label_column= (e.g. image_column='image', label_column='label') to read them as (image, target)"
            )
        if not isinstance(sample, (tuple, list)) or len(sample) != 2:
            raise ValueError(
                f"real_dataset items must be (image, target) pairs, but item 0 is a {type(sample).__name__}"
                + (f" of length {len(sample)}" if isinstance(sample, (tuple, list)) else "")
            )
        self._image_form = _ImageForm(sample[0])
        self._target_form = _TargetForm(sample[1])
        self.multi_label = self._target_form.multi_label

        classes = _find_attr(real_dataset, "classes")
        self.class_to_idx: Optional[Dict[str, int]] = _find_attr(real_dataset, "class_to_idx")
        if self.class_to_idx is None and classes is not None:
            self.class_to_idx = {str(c): i for i, c in enumerate(classes)}
        if self.multi_label:
            self.num_classes: Optional[int] = self._target_form.width
        elif classes is not None:
            self.num_classes = len(classes)
        else:
            targets = _find_attr(real_dataset, "targets")
            self.num_classes = int(np.asarray(targets).max()) + 1 if targets is not None and len(targets) else None

        if self.soft_targets and (self.multi_label or self.num_classes is None):
            raise ValueError(
                "soft_targets=True needs a single-label real dataset whose number of classes is known (a `classes` or "
                "`targets` attribute); " + ("this one is multi-label" if self.multi_label else "this one has neither")
            )

        cache_stats = cache.stats()
        self.label_names: Optional[List[str]] = cache_stats.get("label_names")
        self._by_name = bool(self.label_names) and bool(self.class_to_idx)
        self._label_cache: Dict[Label, Any] = {}
        self._check_images(cache_stats.get("image_spec"))
        self._check_cache_labels()

        # corrupt / missing / replaced counters, shared with DataLoader worker processes (fork or
        # spawn) through shared memory; one row per process so no increment is lost to a race
        self._counters = torch.zeros((_COUNTER_SLOTS, len(_COUNTERS)), dtype=torch.int64).share_memory_()
        # which sampler batches have been read: (ticket, synthetic items read) per ring slot,
        # written by whichever process reads the batch, read by the sampler in this process
        self._acks = torch.full((_ACK_SLOTS, 2), -1, dtype=torch.int64).share_memory_()
        self._tickets = 0
        self._warned = False

    # ------------------------------------------------------------------ checks
    def _check_images(self, spec: Optional[Dict[str, int]]) -> None:
        form = self._image_form
        if self.synthetic_transform is not None:
            return
        if form.kind == "other":
            raise ValueError(
                f"real_dataset returns images as {form.description}, a form a synthetic record cannot be "
                "converted to; pass synthetic_transform, which receives a PIL image (mode 'L' or 'RGB') and "
                "must return what the real dataset returns (usually the real dataset's own transform)"
            )
        if spec is not None and form.size is not None and (spec["height"], spec["width"]) != form.size:
            raise ValueError(
                f"cache {self.cache.path} holds {spec['height']}×{spec['width']} images but the real dataset's are "
                f"{form.size[0]}×{form.size[1]}; pass synthetic_transform (e.g. torchvision.transforms.Resize"
                f"({form.size[0]})) so synthetic images match, or use a cache of the real size"
            )

    def _check_cache_labels(self) -> None:
        start = 0
        while True:
            labels, _corrupt = self.cache.scan_labels(start, start + 65536)
            for seq, label in labels.items():
                self.map_label(label, seq=seq)
            seqs = self.cache.seqs(start + 65536, limit=1)
            if not seqs:
                return
            start = seqs[0]

    # ------------------------------------------------------------------ labels
    def resolve_class(self, cls: Union[int, str], *, name: str = "classes") -> int:
        """A class given by index or by name, as an index of the real label space."""
        if isinstance(cls, str):
            if not self.class_to_idx:
                raise ValueError(f"{name} names class {cls!r}, but the real dataset has no class_to_idx; give class indices")
            if cls not in self.class_to_idx:
                raise ValueError(f"{name} names class {cls!r}, which the real dataset lacks; its classes are {list(self.class_to_idx)}")
            return int(self.class_to_idx[cls])
        if isinstance(cls, bool) or not isinstance(cls, (int, np.integer)):
            raise ValueError(f"{name} must hold class indices (int) or class names (str), got {cls!r}")
        cls = int(cls)
        if cls < 0 or (self.num_classes is not None and cls >= self.num_classes):
            space = f"0..{self.num_classes - 1}" if self.num_classes is not None else ">= 0"
            raise ValueError(f"{name} holds class {cls}, outside the real dataset's label space ({space})")
        return cls

    def _refresh_label_names(self) -> None:
        """Adopt label names the cache got after this dataset was built. Called after records
        are read: a writer stores names before its first record (and names never change), so a
        read of the names after reading a record sees them if they belong to it."""
        if self.label_names is not None or not self.class_to_idx:
            return
        names = self.cache.label_names
        if names:
            self.label_names = names
            self._by_name = True
            self._label_cache.clear()

    def map_label(self, label: Label, *, seq: Optional[int] = None) -> Union[int, Tuple[int, ...], SoftLabel]:
        """A synthetic record's label in the real label space: an int, a tuple of ints for a
        multi-label real dataset, or a :class:`~synthaug.cache.codec.SoftLabel` of real classes.

        Raises:
            ValueError: the label (or its name) is outside the real label space; a soft label
                without ``soft_targets=True``.
        """
        try:
            return self._label_cache[label]
        except KeyError:
            pass
        if isinstance(label, SoftLabel):
            out = self._map_soft(label, seq)
            self._label_cache[label] = out
            return out
        raw = label if isinstance(label, tuple) else (label,)
        mapped = tuple(self._map_one(v, seq, label) for v in raw)
        if self.multi_label:
            out: Union[int, Tuple[int, ...]] = mapped
        else:
            if len(mapped) != 1:
                raise ValueError(
                    f"synthetic record seq={seq} in {self.cache.path} has {len(mapped)} labels {label!r}, but the real "
                    "dataset is single-label; use a cache generated for single-label classes"
                )
            out = mapped[0]
        self._label_cache[label] = out
        return out

    def _map_soft(self, label: SoftLabel, seq: Optional[int]) -> SoftLabel:
        where = f"synthetic record seq={seq} in {self.cache.path}" if seq is not None else f"synthetic label {label!r}"
        if not self.soft_targets:
            raise ValueError(
                f"{where} has a soft label {dict(label)!r}; pass soft_targets=True (MixedDataset / mixed_loader) so every "
                "target is a vector of class probabilities and a batch collates, and train with a loss that takes them"
            )
        weights: Dict[int, float] = {}
        for value, weight in label.items():  # the target first, so the mapped label keeps it first
            cls = self._map_one(value, seq, label)
            weights[cls] = weights.get(cls, 0.0) + weight
        return SoftLabel(weights)

    def _map_one(self, value: int, seq: Optional[int], label: Label) -> int:
        where = f"synthetic record seq={seq} in {self.cache.path}" if seq is not None else f"synthetic label {label!r}"
        if self._by_name:
            names = self.label_names
            if not 0 <= value < len(names):
                raise ValueError(
                    f"{where} has label {value}, but the cache names only {len(names)} labels ({names}); "
                    "fix the generator's labels or the cache's label_names"
                )
            name = names[value]
            if name not in self.class_to_idx:
                raise ValueError(
                    f"{where} has label {value} ({name!r}), a class the real dataset lacks (its classes: "
                    f"{list(self.class_to_idx)}); generate only the real dataset's classes"
                )
            return int(self.class_to_idx[name])
        if value < 0 or (self.num_classes is not None and value >= self.num_classes):
            space = f"0..{self.num_classes - 1}" if self.num_classes is not None else ">= 0"
            raise ValueError(
                f"{where} has label {value}, outside the real dataset's label space ({space}); generate with the "
                "real dataset's class indices, or store label_names in the cache to map labels by name"
            )
        return value

    # ------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self.real_dataset)

    def __getitem__(self, index: Union[int, SyntheticIndex]) -> Any:
        if type(index) is SyntheticIndex:
            return self.__getitems__([index])[0]
        return self._finish_real(self.real_dataset[index])

    def __getitems__(self, indices: Sequence[Union[int, SyntheticIndex]]) -> List[Any]:
        """The items of one batch, in order; the synthetic ones read in one cache transaction."""
        out: List[Any] = [None] * len(indices)
        syn_pos: List[int] = []
        real_pos: List[int] = []
        for j, index in enumerate(indices):
            (syn_pos if type(index) is SyntheticIndex else real_pos).append(j)
        if real_pos:
            real_idx = [indices[j] for j in real_pos]
            getitems = getattr(self.real_dataset, "__getitems__", None)
            items = getitems(real_idx) if callable(getitems) else [self.real_dataset[i] for i in real_idx]
            for j, item in zip(real_pos, items):
                out[j] = self._finish_real(item)
        if syn_pos:
            syn = [indices[j] for j in syn_pos]
            batch = self._read(syn)
            self._mark_read(syn)
            self._refresh_label_names()
            images = self._fast_images(batch.images)
            if images is None:
                images = [self._synthetic_image(image) for image in batch.images]
            for j, seq, image, label in zip(syn_pos, batch.seqs, images, batch.labels):
                out[j] = self._synthetic_item(seq, image, label)
        return out

    def _finish_real(self, item: Any) -> Any:
        if self.transform is None and self.target_transform is None and not self.soft_targets and not self.mark_synthetic:
            return item
        image, target = item
        if self.transform is not None:
            image = self.transform(image)
        if self.soft_targets:
            target = self._probabilities({int(target): 1.0})
        if self.target_transform is not None:
            target = self.target_transform(target)
        return (image, target, False) if self.mark_synthetic else (image, target)

    def _probabilities(self, weights: Dict[int, float]) -> torch.Tensor:
        out = torch.zeros(self.num_classes, dtype=torch.float32)
        for cls, weight in weights.items():
            out[cls] = weight
        return out

    def _synthetic_image(self, image: np.ndarray) -> Any:
        image = self._image_form.convert(image)
        if self.synthetic_transform is not None:
            image = self.synthetic_transform(image)
        if self.transform is not None:
            image = self.transform(image)
        return image

    def _fast_images(self, images) -> Optional[List[torch.Tensor]]:
        """The batch's synthetic images as the transform would make them, converted in one step
        without a PIL round trip, or ``None`` where that cannot be exact (see :class:`_BatchToTensor`)."""
        key = (self.transform, self.synthetic_transform)  # recomputed if either is replaced
        cached = self.__dict__.get("_batch_to_tensor")
        if cached is None or cached[0][0] is not key[0] or cached[0][1] is not key[1]:
            cached = self._batch_to_tensor = (key, _BatchToTensor.of(self.transform) if self.synthetic_transform is None else None)
        fast = cached[1]
        if fast is None or not isinstance(images, np.ndarray) or not self._image_form.takes(images.shape[3]):
            return None
        return fast(images)

    def _synthetic_item(self, seq: int, image: Any, label: Label) -> Tuple[Any, Any]:
        mapped = self.map_label(label, seq=seq)
        if self.soft_targets:
            target = self._probabilities(mapped if isinstance(mapped, SoftLabel) else {mapped: 1.0})
        else:
            target = self._target_form.make(mapped)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return (image, target, True) if self.mark_synthetic else (image, target)

    # ------------------------------------------------------------------ batches in flight
    def _new_ticket(self) -> int:
        """A ticket for a batch a sampler (in this process) hands out."""
        self._tickets += 1
        return self._tickets

    def _mark_read(self, indices: Sequence[SyntheticIndex]) -> None:
        """Mark the tickets of these synthetic indices read (in whichever process reads them)."""
        counts: Dict[int, int] = {}
        for index in indices:
            if index.ticket >= 0:
                counts[index.ticket] = counts.get(index.ticket, 0) + 1
        acks = self._ack_view()
        for ticket, n in counts.items():
            slot = ticket % _ACK_SLOTS
            if acks[slot, 0] == ticket:
                acks[slot, 1] += n
            else:  # first read of this ticket: the count before the ticket, so a reader never
                acks[slot, 1] = n  # sees this ticket with another ticket's count
                acks[slot, 0] = ticket

    def _was_read(self, ticket: int, n: int) -> bool:
        """Whether the ``n`` synthetic items of the batch with ``ticket`` have been read."""
        acks = self._ack_view()
        slot = ticket % _ACK_SLOTS
        return acks[slot, 0] == ticket and acks[slot, 1] >= n

    def _ack_view(self) -> np.ndarray:
        """A numpy view of the shared ack table (element access at numpy, not torch, cost);
        made per process, never pickled: a copy would not be shared."""
        view = self.__dict__.get("_acks_np")
        if view is None:
            view = self._acks_np = self._acks.numpy()
        return view

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_acks_np", None)
        return state

    # ------------------------------------------------------------------ reading, bad records
    def _read(self, indices: List[SyntheticIndex]) -> RecordBatch:
        try:
            return self.cache.read_batch([index.seq for index in indices], with_meta=False)
        except (CorruptRecordError, KeyError):
            if self.on_corrupt == "raise":
                raise
        records = [self._read_one(index) for index in indices]
        return RecordBatch([r.seq for r in records], [r.image for r in records], [r.label for r in records], None)

    def _read_one(self, index: SyntheticIndex) -> Record:
        seq = index.seq
        try:
            return self.cache.get(seq)
        except CorruptRecordError:
            if self.on_corrupt == "raise":
                raise
            kind = 0
        except KeyError:
            if self.on_corrupt == "raise":
                raise
            kind = 1
        self._count(kind)
        rec = self._replacement(index, gone=kind == 1)
        self._count(2)
        if not self._warned:
            self._warned = True
            what = "is corrupt" if kind == 0 else "was gone when its batch was read"
            warnings.warn(
                f"synthetic record seq={seq} in {self.cache.path} {what}; served seq={rec.seq} (same label "
                f"{rec.label!r}, already served) instead (on_corrupt='replace'; warned once per process, counts in "
                f"MixedDataset.stats(); `synthaug cache verify {self.cache.path}` lists damaged records)",
                RuntimeWarning,
                stacklevel=3,
            )
        return rec

    def _replacement(self, index: SyntheticIndex, *, gone: bool) -> Record:
        """The nearest older readable record with the label the sampler drew ``index`` with, in
        its shard: one it has already served (fresh records are newer), so nothing fresh is
        used up. Raises rather than serve a record of another class."""
        seq, stride, label = index.seq, max(1, index.stride), index.label
        why = "was gone when its batch was read" if gone else "is corrupt"
        if label is None and not gone:
            own, _ = self.cache.scan_labels(seq, seq + 1)
            label = own.get(seq)  # None when the damage reaches the label or header
        if label is None:
            raise CorruptRecordError(
                seq,
                f"the record {why} and its label is unknown (the index did not come from a RatioBatchSampler, and the "
                "record cannot tell), so no replacement of the same class can be chosen (on_corrupt='replace')",
                self.cache.path,
            )
        label = tuple(label) if isinstance(label, list) else label
        lo = max(0, seq - _REPLACE_SEARCH)
        for hi in range(seq, lo, -_SCAN_WINDOW):
            labels, _ = self.cache.scan_labels(max(lo, hi - _SCAN_WINDOW), hi)
            for cand in sorted(labels, reverse=True):
                if cand % stride != seq % stride or labels[cand] != label:
                    continue
                try:
                    return self.cache.get(cand)
                except (CorruptRecordError, KeyError):
                    continue
        raise CorruptRecordError(
            seq,
            f"the record {why}, and no readable record with its label {label!r} is older than it in its shard (within "
            f"{_REPLACE_SEARCH} records) to replace it (on_corrupt='replace' never uses a newer record: it may still be "
            "served fresh)",
            self.cache.path,
        )

    def _count(self, column: int) -> None:
        info = torch.utils.data.get_worker_info()
        row = 0 if info is None else min(info.id + 1, _COUNTER_SLOTS - 1)
        self._counters[row, column] += 1

    def stats(self) -> Dict[str, int]:
        """Bad synthetic records met so far, in this process and its DataLoader workers:
        ``{"corrupt", "missing", "replaced"}``."""
        totals = self._counters.sum(dim=0).tolist()
        return dict(zip(_COUNTERS, (int(v) for v in totals)))

    def __repr__(self) -> str:
        return f"MixedDataset(real={type(self.real_dataset).__name__}(n={len(self.real_dataset)}), cache={self.cache!r})"
