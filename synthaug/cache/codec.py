"""The byte layout of one cache record, and image encodings.

A record value is::

    header (28 bytes, big-endian)
        magic       4s   b"SAUG"
        version     u8   FORMAT_VERSION
        encoding    u8   0 raw, 1 png, 2 jpeg, 3 webp
        channels    u8   1 (gray) or 3 (RGB)
        flags       u8   bit 0: the label is a list (multi-label)
        height      u16
        width       u16
        n_labels    u16
        (pad)       2 bytes, zero
        meta_len    u32
        image_len   u32
        crc32c      u32  CRC-32C (Castagnoli) over header bytes [0, 24) and everything after it
    labels      n_labels × int32 (big-endian)
    meta        meta_len bytes of compact UTF-8 JSON (the provenance dict)
    image       image_len bytes: raw H×W×C uint8, or a PNG/JPEG/WebP file

Everything a record needs to be read back is in the record itself, so records of different
encodings can share a cache. The CRC covers the header too, so a flipped byte anywhere is found.
CRC-32C rather than zlib's CRC-32: with the SSE4.2/ARMv8 instruction the ``crc32c`` package uses,
it checks a 256×256 RGB raw record in ~6 µs instead of ~35 µs (benchmarks/cache.py).
"""

from __future__ import annotations

import io
import json
import math
import struct
from enum import IntEnum
from pathlib import PurePath
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from crc32c import crc32c as _crc32c

from synthaug.errors import CorruptRecordError

__all__ = [
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "Encoding",
    "Record",
    "decode_image",
    "decode_record",
    "encode_image",
    "encode_record",
    "peek_label",
    "peek_meta",
    "read_header",
]

MAGIC = b"SAUG"
FORMAT_VERSION = 1
_HEADER = struct.Struct(">4sBBBBHHH2xIII")
HEADER_SIZE = _HEADER.size  # 28
_CRC_OFFSET = HEADER_SIZE - 4
_FLAG_MULTILABEL = 1

Label = Union[int, Tuple[int, ...]]


class Encoding(IntEnum):
    """How a record stores its image. ``raw`` reads fastest; ``png`` is lossless and smaller;
    ``jpeg``/``webp`` are lossy and smallest."""

    raw = 0
    png = 1
    jpeg = 2
    webp = 3

    @classmethod
    def parse(cls, value: Union[str, int, "Encoding"]) -> "Encoding":
        if isinstance(value, Encoding):
            return value
        if isinstance(value, str):
            try:
                return cls[value.lower()]
            except KeyError:
                pass
        elif isinstance(value, int) and value in cls._value2member_map_:
            return cls(value)
        names = ", ".join(e.name for e in cls)
        raise ValueError(f"unknown image encoding {value!r}; choose one of: {names}")


class Record:
    """One cached synthetic sample.

    Attributes:
        seq: its sequence number in the cache.
        image: uint8 numpy array H×W×C (C = 1 or 3), writable.
        label: an int, or a tuple of ints for a multi-label record.
        meta: the provenance dict (parsed from JSON on first access).

    Unpacks like a tuple: ``image, label, meta = record``.
    """

    __slots__ = ("seq", "image", "label", "_meta_bytes", "_meta")

    def __init__(self, seq: Optional[int], image: np.ndarray, label: Label, meta_bytes: bytes) -> None:
        self.seq = seq
        self.image = image
        self.label = label
        self._meta_bytes = meta_bytes
        self._meta = None

    @property
    def meta(self) -> Dict[str, Any]:
        if self._meta is None:
            self._meta = json.loads(self._meta_bytes) if self._meta_bytes else {}
        return self._meta

    def __iter__(self):
        return iter((self.image, self.label, self.meta))

    def __repr__(self) -> str:
        h, w, c = self.image.shape
        return f"Record(seq={self.seq}, image=uint8[{h}x{w}x{c}], label={self.label!r})"


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (PurePath, bytes)):
        return str(value) if isinstance(value, PurePath) else value.hex()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def encode_meta(meta: Dict[str, Any]) -> bytes:
    """Compact JSON of a provenance dict; refuses what cannot round-trip, naming the key."""
    if not isinstance(meta, dict):
        raise ValueError(f"record metadata must be a dict, got {type(meta).__name__}")
    try:
        return json.dumps(meta, separators=(",", ":"), default=_json_default, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        for key, value in meta.items():
            try:
                json.dumps(value, default=_json_default, allow_nan=False)
            except (TypeError, ValueError) as inner:
                raise ValueError(f"record metadata key {key!r} cannot be stored as JSON: {inner}") from None
        raise ValueError(f"record metadata cannot be stored as JSON: {exc}") from None


def encode_image(image: np.ndarray, encoding: Encoding, quality: int = 95, png_level: int = 1) -> bytes:
    """Bytes of a uint8 H×W×C image in ``encoding``."""
    if encoding is Encoding.raw:
        return np.ascontiguousarray(image).tobytes()
    from PIL import Image

    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    buf = io.BytesIO()
    if encoding is Encoding.png:
        pil.save(buf, format="PNG", compress_level=png_level)
    elif encoding is Encoding.jpeg:
        pil.save(buf, format="JPEG", quality=quality)
    else:
        pil.save(buf, format="WEBP", quality=quality)
    return buf.getvalue()


def decode_image(data, encoding: Encoding, height: int, width: int, channels: int) -> np.ndarray:
    """A writable uint8 H×W×C array from stored bytes (``data``: bytes or memoryview)."""
    if encoding is Encoding.raw:
        expected = height * width * channels
        if len(data) != expected:
            raise ValueError(f"raw image holds {len(data)} bytes, expected {expected}")
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, channels).copy()
    from PIL import Image

    with Image.open(io.BytesIO(data)) as pil:
        pil.load()
        arr = np.asarray(pil.convert("L" if channels == 1 else "RGB"))
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape != (height, width, channels):
        raise ValueError(f"decoded image has shape {arr.shape}, header says {(height, width, channels)}")
    if not arr.flags.writeable:
        arr = arr.copy()
    return arr


def encode_record(
    image: np.ndarray,
    label: Label,
    meta_bytes: bytes,
    encoding: Encoding,
    *,
    quality: int = 95,
    png_level: int = 1,
) -> bytes:
    """One record value. ``image`` must already be uint8 H×W×C with C in (1, 3)."""
    h, w, c = image.shape
    if isinstance(label, (tuple, list)):
        labels = [int(v) for v in label]
        flags = _FLAG_MULTILABEL
    else:
        labels = [int(label)]
        flags = 0
    for v in labels:
        if not -(2**31) <= v < 2**31:
            raise ValueError(f"label {v} does not fit in int32")
    img = encode_image(image, encoding, quality=quality, png_level=png_level)
    body = struct.pack(f">{len(labels)}i", *labels) + meta_bytes + img
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, int(encoding), c, flags, h, w, len(labels), len(meta_bytes), len(img), 0)
    crc = _crc32c(body, _crc32c(head[:_CRC_OFFSET]))
    return head[:_CRC_OFFSET] + struct.pack(">I", crc) + body


def read_header(buf) -> Tuple:
    """The header fields of a record value, checked for magic, version and length."""
    if len(buf) < HEADER_SIZE:
        raise ValueError(f"value of {len(buf)} bytes is shorter than the {HEADER_SIZE}-byte header")
    fields = _HEADER.unpack_from(buf, 0)
    magic, version, _enc, channels, _flags, _h, _w, n_labels, meta_len, image_len, _crc = fields
    if magic != MAGIC:
        raise ValueError(f"bad magic {bytes(magic)!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"record format version {version} is newer than this synthaug ({FORMAT_VERSION}); upgrade synthaug")
    if channels not in (1, 3):
        raise ValueError(f"header says {channels} channels")
    if _enc >= len(Encoding):
        raise ValueError(f"unknown encoding code {_enc}")
    expected = HEADER_SIZE + 4 * n_labels + meta_len + image_len
    if len(buf) != expected:
        raise ValueError(f"value holds {len(buf)} bytes, header says {expected}")
    return fields


def _labels_from(buf, n_labels: int, flags: int) -> Label:
    values = struct.unpack_from(f">{n_labels}i", buf, HEADER_SIZE)
    return tuple(values) if flags & _FLAG_MULTILABEL else values[0]


_ENCODINGS = tuple(Encoding)
_INT32 = struct.Struct(">i")


def decode_record(buf, seq: Optional[int] = None, *, check_crc: bool = True, path=None) -> Record:
    """A :class:`Record` from a record value (bytes or a memoryview valid for this call).

    Raises:
        CorruptRecordError: naming ``seq`` when the CRC, header or image is bad.
    """
    try:
        _m, _v, enc, channels, flags, h, w, n_labels, meta_len, image_len, crc = read_header(buf)
        meta_start = HEADER_SIZE + 4 * n_labels
        img_start = meta_start + meta_len
        if enc == 0:
            # raw: copy out of the map first, then checksum the copy while it is in CPU cache
            # (one pass over the mapped pages instead of two)
            if image_len != h * w * channels:
                raise ValueError(f"raw image holds {image_len} bytes, expected {h * w * channels}")
            image = np.frombuffer(buf, np.uint8, image_len, img_start).reshape(h, w, channels).copy()
            if check_crc:
                actual = _crc32c(image, _crc32c(buf[HEADER_SIZE:img_start], _crc32c(buf[:_CRC_OFFSET])))
                if actual != crc:
                    raise ValueError(f"CRC-32C mismatch (stored {crc:08x}, computed {actual:08x})")
        else:
            if check_crc:
                actual = _crc32c(buf[HEADER_SIZE:], _crc32c(buf[:_CRC_OFFSET]))
                if actual != crc:
                    raise ValueError(f"CRC-32C mismatch (stored {crc:08x}, computed {actual:08x})")
            image = decode_image(buf[img_start : img_start + image_len], _ENCODINGS[enc], h, w, channels)
        if n_labels == 1 and not flags & _FLAG_MULTILABEL:
            label = _INT32.unpack_from(buf, HEADER_SIZE)[0]
        else:
            label = _labels_from(buf, n_labels, flags)
        meta_bytes = bytes(buf[meta_start:img_start])
    except CorruptRecordError:
        raise
    except Exception as exc:  # any failure to read the bytes back is corruption of this record
        raise CorruptRecordError(seq, str(exc) or type(exc).__name__, path) from None
    return Record(seq, image, label, meta_bytes)


def peek_label(buf, seq: Optional[int] = None, path=None, *, check_crc: bool = True) -> Label:
    """The label of a record value without decoding its image.

    The CRC is checked by default (a flipped label byte would otherwise route a record to the
    wrong class); CRC-32C runs at memory speed, so this stays far cheaper than decoding.
    """
    try:
        fields = read_header(buf)
        if check_crc:
            actual = _crc32c(buf[HEADER_SIZE:], _crc32c(buf[:_CRC_OFFSET]))
            if actual != fields[10]:
                raise ValueError(f"CRC-32C mismatch (stored {fields[10]:08x}, computed {actual:08x})")
    except ValueError as exc:
        raise CorruptRecordError(seq, str(exc), path) from None
    return _labels_from(buf, fields[7], fields[4])


def peek_meta(buf, seq: Optional[int] = None, path=None) -> Dict[str, Any]:
    """The provenance dict of a record value without decoding its image (no CRC check)."""
    try:
        fields = read_header(buf)
        start = HEADER_SIZE + 4 * fields[7]
        return json.loads(bytes(buf[start : start + fields[8]])) if fields[8] else {}
    except ValueError as exc:
        raise CorruptRecordError(seq, str(exc), path) from None


def as_image_batch(images) -> List[np.ndarray]:
    """Normalize what ``SyntheticCache.append`` accepts into a list of uint8 H×W×C arrays.

    Accepted: a numpy array N×H×W×C or N×H×W (uint8); a torch uint8 tensor N×C×H×W (torchvision's
    layout) or N×H×W; a sequence of PIL images, H×W×C / H×W arrays, or C×H×W tensors.
    """
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4:
            raise ValueError(f"images array must be N×H×W×C or N×H×W, got shape {images.shape}")
        return [_check_image(im, i) for i, im in enumerate(images)]
    if _is_tensor(images):
        if images.ndim == 3:
            images = images[:, None]
        if images.ndim != 4:
            raise ValueError(f"images tensor must be N×C×H×W or N×H×W, got shape {tuple(images.shape)}")
        return [_check_image(_tensor_chw(im, i), i) for i, im in enumerate(images)]
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise ValueError(
            f"images must be a uint8 array N×H×W×C, a uint8 tensor N×C×H×W or a list of images; got {type(images).__name__}"
        )
    out = []
    for i, im in enumerate(images):
        if _is_tensor(im):
            im = _tensor_chw(im if im.ndim == 3 else im[None], i)
        elif not isinstance(im, np.ndarray):
            try:
                from PIL import Image
            except ImportError:  # pragma: no cover - pillow is a dependency
                Image = None
            if Image is not None and isinstance(im, Image.Image):
                if im.mode not in ("L", "RGB"):
                    im = im.convert("RGB" if im.mode in ("RGBA", "P", "CMYK", "YCbCr", "LA") else "L")
                im = np.asarray(im)
            else:
                raise ValueError(f"image {i} is a {type(im).__name__}; expected a PIL image, numpy array or tensor")
        if im.ndim == 2:
            im = im[:, :, None]
        out.append(_check_image(im, i))
    return out


def _is_tensor(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "numpy")


def _tensor_chw(t, i: int) -> np.ndarray:
    if t.ndim != 3:
        raise ValueError(f"image tensor {i} must be C×H×W, got shape {tuple(t.shape)}")
    if str(t.dtype) != "torch.uint8":
        raise ValueError(
            f"image tensor {i} has dtype {t.dtype}; images must be uint8 (0..255). "
            "Convert float images with (x * 255).round().clamp(0, 255).to(torch.uint8)."
        )
    return t.detach().cpu().permute(1, 2, 0).numpy()


def _check_image(im: np.ndarray, i: int) -> np.ndarray:
    if im.dtype != np.uint8:
        raise ValueError(
            f"image {i} has dtype {im.dtype}; images must be uint8 (0..255). "
            "Convert float images with (x * 255).round().clip(0, 255).astype(np.uint8)."
        )
    if im.ndim != 3 or im.shape[2] not in (1, 3):
        raise ValueError(f"image {i} must be H×W×C with C = 1 or 3, got shape {im.shape}")
    if not (0 < im.shape[0] < 65536 and 0 < im.shape[1] < 65536):
        raise ValueError(f"image {i} has unsupported size {im.shape[:2]}")
    return im


def as_labels(labels, n: int) -> List[Label]:
    """One label per image: an int, or a list/tuple of ints (multi-label). A single int is
    broadcast to all ``n`` images."""
    if isinstance(labels, (int, np.integer)) and not isinstance(labels, bool):
        return [int(labels)] * n
    if _is_tensor(labels):
        labels = labels.tolist()
    elif isinstance(labels, np.ndarray):
        labels = labels.tolist()
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise ValueError(f"labels must be an int or a sequence of {n} labels, got {type(labels).__name__}")
    if len(labels) != n:
        raise ValueError(f"got {n} images but {len(labels)} labels; pass one label per image")
    out: List[Label] = []
    for i, lab in enumerate(labels):
        if isinstance(lab, (list, tuple)):
            if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in lab):
                raise ValueError(f"label {i} ({lab!r}) must be an int or a list of ints")
            out.append(tuple(int(v) for v in lab))
        elif isinstance(lab, (int, np.integer)) and not isinstance(lab, bool):
            out.append(int(lab))
        elif isinstance(lab, float) and math.isfinite(lab) and lab == int(lab):
            out.append(int(lab))
        else:
            raise ValueError(f"label {i} ({lab!r}) must be an int or a list of ints")
    return out


def as_metas(meta, n: int) -> List[Dict[str, Any]]:
    """One provenance dict per image; a single dict is shared by all ``n`` images."""
    if meta is None:
        return [{} for _ in range(n)]
    if isinstance(meta, dict):
        return [dict(meta) for _ in range(n)]
    if isinstance(meta, (str, bytes)) or not isinstance(meta, Sequence):
        raise ValueError(f"meta must be a dict or a list of {n} dicts, got {type(meta).__name__}")
    if len(meta) != n:
        raise ValueError(f"got {n} images but {len(meta)} meta dicts; pass one dict per image")
    for i, m in enumerate(meta):
        if not isinstance(m, dict):
            raise ValueError(f"meta {i} must be a dict, got {type(m).__name__}")
    return [dict(m) for m in meta]
