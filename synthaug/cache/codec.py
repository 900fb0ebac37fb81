"""The byte layout of one cache record, and image encodings.

A record value is::

    header (28 bytes, big-endian)
        magic       4s   b"SAUG"
        version     u8   FORMAT_VERSION
        encoding    u8   0 raw, 1 png, 2 jpeg, 3 webp
        channels    u8   1 (gray) or 3 (RGB)
        flags       u8   bit 0: the label is a list (multi-label); bit 1: a soft label
        height      u16
        width       u16
        n_labels    u16
        (pad)       2 bytes, zero
        meta_len    u32
        image_len   u32
        crc32c      u32  CRC-32C (Castagnoli) over header bytes [0, 24) and everything after it
    labels      n_labels × int32 (big-endian); a soft label: n_labels × (int32 class, float64
                weight), its first entry the class the image was made for
    meta        meta_len bytes of compact UTF-8 JSON (the provenance dict)
    image       image_len bytes: raw H×W×C uint8, or a PNG/JPEG/WebP file

Everything a record needs to be read back is in the record itself, so records of different
encodings can share a cache. The CRC covers the header too, so a flipped byte anywhere is found.
CRC-32C rather than zlib's CRC-32: with the SSE4.2/ARMv8 instruction the ``crc32c`` package uses,
it checks a 256×256 RGB raw record in ~6 µs instead of ~35 µs (benchmarks/cache.py).

Reading is defensive: every reader here (:func:`read_header`, :func:`decode_record`,
:func:`peek_label`, :func:`peek_meta`, :func:`decode_image`, ``Record.meta``) raises only
:class:`~synthaug.errors.CorruptRecordError` for bad bytes, whatever they are. A header that passes
its CRC is still checked for consistency (version, encoding, channels, flags, non-zero size, label
count, total length): on the raw hot path that is one chain of constant-time comparisons. A
PNG/JPEG/WebP payload is checked *before* PIL sees it: its own header must declare the record's
size and pixel format, its pixel count be at most ``PIL.Image.MAX_IMAGE_PIXELS``, and the size
not exceed what its format can expand to from the payload's length (``_MAX_EXPANSION_*``), so a
crafted record can neither allocate memory out of proportion to its size nor decode for long.

One concept in one module (longer than the ~600 lines the project aims at, on purpose): the record's byte
format, with its encoder, decoder and the checks of every field, so the format reads in one place.
"""

from __future__ import annotations

import io
import json
import math
import struct
from enum import IntEnum
from pathlib import PurePath
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from crc32c import crc32c as _crc32c

from synthaug.errors import CorruptRecordError
from synthaug.imaging import to_hwc_uint8

__all__ = [
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "Encoding",
    "Record",
    "RecordBatch",
    "SoftLabel",
    "label_class",
    "decode_image",
    "decode_batch",
    "decode_record",
    "encode_image",
    "encode_record",
    "peek_label",
    "peek_meta",
    "relabel_record",
    "read_header",
]

MAGIC = b"SAUG"
FORMAT_VERSION = 1
_HEADER = struct.Struct(">4sBBBBHHH2xIII")
HEADER_SIZE = _HEADER.size  # 28
_CRC_OFFSET = HEADER_SIZE - 4
_FLAG_MULTILABEL = 1
_FLAG_SOFT = 2
_KNOWN_FLAGS = _FLAG_MULTILABEL | _FLAG_SOFT
_MAX_ENCODING = 3
_SOFT_PAIR = struct.Struct(">id")  # class, weight
_SOFT_PAIR_SIZE = _SOFT_PAIR.size  # 12
_SOFT_SUM_TOLERANCE = 1e-6


class SoftLabel(dict):
    """A soft label: ``{class index: weight}``, weights > 0 that sum to 1 (within 1e-6).

    Its first entry is the class the image was made for (a translation's target class, say); the
    cache, the sampler's class targeting and per-class ratios file the record under that class,
    while a classifier trained on it learns the whole distribution. It compares equal to the plain
    dict of its entries (``SoftLabel({6: 0.7, 2: 0.3}) == {6: 0.7, 2: 0.3}``), is immutable and
    hashable, and its weights survive the cache exactly (stored as float64).

    Raises:
        ValueError: no entries, a class that is not an int in [0, 2**31), or a weight that is not
            finite and > 0, or weights that do not sum to 1.
    """

    __slots__ = ()

    def __init__(self, weights) -> None:
        items = list(dict(weights).items())
        if not items:
            raise ValueError("a soft label needs at least one class")
        clean = []
        for cls, w in items:
            if isinstance(cls, bool) or not isinstance(cls, (int, np.integer)) or not 0 <= int(cls) < 2**31:
                raise ValueError(f"soft label {dict(weights)!r}: class {cls!r} is not a class index (int >= 0)")
            if isinstance(w, bool) or not isinstance(w, (int, float, np.number)) or not math.isfinite(float(w)) or float(w) <= 0:
                raise ValueError(f"soft label {dict(weights)!r}: weight {w!r} of class {cls} must be a finite number > 0")
            clean.append((int(cls), float(w)))
        total = math.fsum(w for _, w in clean)
        if abs(total - 1.0) > _SOFT_SUM_TOLERANCE:
            raise ValueError(f"soft label {dict(weights)!r}: weights sum to {total:.9g}, not 1")
        super().__init__(clean)

    @property
    def target(self) -> int:
        """The class the image was made for: the first entry."""
        return next(iter(self))

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __repr__(self) -> str:
        return f"SoftLabel({dict(self)!r})"

    def __reduce__(self):
        return (SoftLabel, (dict(self),))

    def _immutable(self, *args, **kwargs):
        raise TypeError("a SoftLabel is immutable; make a new one")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _immutable  # type: ignore[assignment]


Label = Union[int, Tuple[int, ...], SoftLabel]


def label_class(label: Label):
    """The class a record is filed under: a soft label's :attr:`~SoftLabel.target`, any other
    label itself (an int, or the tuple of a multi-label record)."""
    return label.target if isinstance(label, SoftLabel) else label


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
        label: an int, a tuple of ints for a multi-label record, or a :class:`SoftLabel`.
        meta: the provenance dict, parsed from the record's UTF-8 JSON on first access (so the
            hot read path never parses it). Raises :class:`CorruptRecordError` if those bytes
            are not a JSON object in UTF-8 (possible only for a record decoded with
            ``check_crc=False`` or crafted to pass its CRC).

    Unpacks like a tuple: ``image, label, meta = record``.
    """

    __slots__ = ("seq", "image", "label", "_meta_bytes", "_meta", "_path")

    def __init__(self, seq: Optional[int], image: np.ndarray, label: Label, meta_bytes: bytes, path=None) -> None:
        self.seq = seq
        self.image = image
        self.label = label
        self._meta_bytes = meta_bytes
        self._meta = None
        self._path = path

    @property
    def meta(self) -> Dict[str, Any]:
        if self._meta is None:
            self._meta = _parse_meta(self._meta_bytes, self.seq, self._path)
        return self._meta

    def __iter__(self):
        return iter((self.image, self.label, self.meta))

    def __repr__(self) -> str:
        h, w, c = self.image.shape
        return f"Record(seq={self.seq}, image=uint8[{h}x{w}x{c}], label={self.label!r})"


def _parse_meta(meta_bytes, seq: Optional[int], path) -> Dict[str, Any]:
    """The provenance dict stored as ``meta_bytes`` (compact UTF-8 JSON; empty means ``{}``).

    Raises:
        CorruptRecordError: the bytes are not UTF-8, not JSON, or not a JSON object.
    """
    if not meta_bytes:
        return {}
    try:
        # decode first: json.loads(bytes) would also accept UTF-16/32, which a record never holds
        value = json.loads(bytes(meta_bytes).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CorruptRecordError(seq, f"metadata is not UTF-8 JSON: {exc}", path) from None
    if not isinstance(value, dict):
        raise CorruptRecordError(seq, f"metadata is a JSON {type(value).__name__}, not an object", path)
    return value


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


# Most bytes of decoded pixels a PNG/JPEG/WebP payload may expand to, per payload byte; a record
# whose header asks for more is refused before anything is decoded.
#   png:  1032 is deflate's own limit (258 bytes per 2-bit length/distance pair), and a PNG also
#         stores a filter byte per row: no PNG file can decode to more.
#   jpeg: 768 = 3 bytes × 64 pixels per 2 bits: sequential Huffman coding (the only JPEG accepted)
#         spends at least a 1-bit DC and a 1-bit end-of-block code on each 8×8 block of each
#         component; a payload claiming more is truncated (libjpeg would pad it with gray).
#   webp: no format limit (VP8's arithmetic coder and VP8L's 0-bit Huffman codes can code a flat
#         image in almost nothing), so this one is calibrated: libwebp's lossy output (what
#         synthaug writes) for a flat image decodes to at most ~1,700 RGB bytes per byte (measured
#         up to 8192×8192), and 8192 leaves ~5× room. Lossless WebP of a near-flat image can
#         exceed it (~77,000 at 8192²) and is then refused; synthaug never writes lossless WebP.
#         WebP always decodes to RGB, so it counts 3 bytes per pixel whatever the record's C.
_MAX_EXPANSION_PNG = 1032
_MAX_EXPANSION_JPEG = 768
_MAX_EXPANSION_WEBP = 8192
_PIL_FORMATS = ("", "PNG", "JPEG", "WEBP")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


def _payload_geometry(data: bytes, encoding: int, channels: int) -> Tuple[int, int, int, int]:
    """What a PNG/JPEG/WebP payload declares in its own header, read without PIL (which, for
    WebP, allocates the canvas as soon as it opens the file).

    Returns:
        ``(width, height, decoded channels, max expansion)``: the image size, the bytes per pixel
        the decoder produces, and the most decoded bytes per payload byte such a file can hold.

    Raises:
        ValueError: not such a file, or a kind synthaug never writes and does not read: PNG other
            than 8-bit gray (C = 1) or RGB (C = 3); JPEG other than sequential Huffman-coded with
            C components (progressive and arithmetic-coded JPEG can cost many passes over the
            image per payload byte); extended WebP (VP8X: alpha, animation, metadata).
    """
    if encoding == 1:
        if len(data) < 33 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
            raise ValueError("png payload is not a PNG file (no PNG signature and IHDR chunk)")
        depth, color = data[24], data[25]
        if depth != 8 or color != (0 if channels == 1 else 2):
            raise ValueError(
                f"PNG payload has bit depth {depth}, color type {color}; a {channels}-channel record "
                f"holds an 8-bit {'gray (color type 0)' if channels == 1 else 'RGB (color type 2)'} PNG"
            )
        return _U32.unpack_from(data, 16)[0], _U32.unpack_from(data, 20)[0], channels, _MAX_EXPANSION_PNG
    if encoding == 2:
        width, height, components = _jpeg_frame(data)
        if components != channels:
            raise ValueError(f"JPEG payload has components={components}; a {channels}-channel record has {channels}")
        return width, height, channels, _MAX_EXPANSION_JPEG
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise ValueError("webp payload is not a WebP file (no RIFF/WEBP signature)")
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = (data[26] | data[27] << 8) & 0x3FFF, (data[28] | data[29] << 8) & 0x3FFF
        return width, height, 3, _MAX_EXPANSION_WEBP
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, 3, _MAX_EXPANSION_WEBP
    if chunk == b"VP8X":
        raise ValueError("WebP payload is extended (VP8X: alpha, animation or metadata); a record holds a simple WebP")
    raise ValueError(f"WebP payload has no VP8 or VP8L bitstream header (first chunk {bytes(chunk)!r})")


# SOF markers of sequential Huffman-coded JPEG: baseline (what PIL writes) and extended
_JPEG_SEQUENTIAL_HUFFMAN = (0xC0, 0xC1)


def _jpeg_frame(data: bytes) -> Tuple[int, int, int]:
    """``(width, height, components)`` from the frame header (SOFn) of a JPEG, walking its marker
    segments up to the first scan (O(number of segments), each at least 2 bytes).

    Raises:
        ValueError: not a JPEG, no frame header before the first scan, or not sequential Huffman.
    """
    n = len(data)
    if data[:2] != b"\xff\xd8":
        raise ValueError("jpeg payload is not a JPEG file (no SOI marker)")
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ValueError(f"JPEG payload has no marker at byte {i} (0x{data[i]:02x})")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            i += 2
            continue
        if marker in (0xD8, 0xD9, 0xDA):  # SOI, EOI, SOS
            break
        length = data[i + 2] << 8 | data[i + 3]
        if length < 2:
            raise ValueError(f"JPEG payload has a marker segment of length {length} at byte {i}")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn, not DHT/JPG/DAC
            if marker not in _JPEG_SEQUENTIAL_HUFFMAN:
                raise ValueError(
                    f"JPEG payload is coded with SOF{marker - 0xC0} (progressive, lossless or arithmetic); "
                    "a record holds baseline (sequential Huffman) JPEG"
                )
            if length < 8 or i + 10 > n:
                raise ValueError("JPEG payload has a truncated frame header")
            return _U16.unpack_from(data, i + 7)[0], _U16.unpack_from(data, i + 5)[0], data[i + 9]
        i += 2 + length
    raise ValueError("JPEG payload has no frame header (SOFn) before its first scan")


def _decode_image(data, encoding: int, height: int, width: int, channels: int) -> np.ndarray:
    """:func:`decode_image` raising ``ValueError``/PIL errors (the callers wrap them)."""
    if encoding == 0:
        expected = height * width * channels
        if len(data) != expected:
            raise ValueError(f"raw image holds {len(data)} bytes, expected {height}×{width}×{channels} = {expected}")
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, channels).copy()
    if not 0 < encoding <= _MAX_ENCODING:
        raise ValueError(f"unknown encoding code {encoding}")
    from PIL import Image

    name = _PIL_FORMATS[encoding]
    data = bytes(data)
    pixels = height * width
    cap = Image.MAX_IMAGE_PIXELS
    if cap and pixels > cap:
        raise ValueError(
            f"header says a {height}×{width} image ({pixels} pixels), more than PIL.Image.MAX_IMAGE_PIXELS "
            f"({cap}); refused before decoding (raise that limit to read such images)"
        )
    p_width, p_height, p_channels, expansion = _payload_geometry(data, encoding, channels)
    if (p_width, p_height) != (width, height):
        raise ValueError(f"{name} payload is {p_height}×{p_width}, header says {height}×{width}")
    if pixels * p_channels > expansion * len(data):
        raise ValueError(
            f"header says a {height}×{width} image but its {name} payload is only {len(data)} bytes: more than "
            f"{expansion}× expansion (a decompression bomb or a damaged header); refused before decoding"
        )
    want = "L" if channels == 1 else "RGB"
    with Image.open(io.BytesIO(data), formats=(name,)) as pil:
        # checked again on PIL's own reading of the file, before load() allocates the pixels
        if pil.size != (width, height):
            raise ValueError(f"{name} payload is {pil.size[1]}×{pil.size[0]}, header says {height}×{width}")
        mode = "RGB" if encoding == 3 else want  # WebP has no gray mode: gray is stored as RGB
        if pil.mode != mode:
            raise ValueError(f"{name} payload has PIL mode {pil.mode}; a {channels}-channel record holds {mode}")
        if getattr(pil, "n_frames", 1) != 1:
            raise ValueError(f"{name} payload has {pil.n_frames} frames; a record holds one image")
        if pil.info.get("progressive") or pil.info.get("progression"):
            raise ValueError("JPEG payload is progressive; a record holds baseline JPEG")
        pil.load()
        arr = np.asarray(pil if pil.mode == want else pil.convert(want))
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape != (height, width, channels) or arr.dtype != np.uint8:
        raise ValueError(f"decoded image is {arr.dtype} {arr.shape}, header says uint8 {(height, width, channels)}")
    if not arr.flags.writeable:
        arr = arr.copy()
    return arr


def decode_image(
    data, encoding: Encoding, height: int, width: int, channels: int, *, seq: Optional[int] = None, path=None
) -> np.ndarray:
    """A writable uint8 H×W×C array from a record's image bytes (``data``: bytes or memoryview).

    ``raw`` must hold exactly H×W×C bytes. A PNG/JPEG/WebP payload must declare exactly H×W in
    its own header, hold one 8-bit gray (C = 1) or RGB (C = 3) frame (WebP: RGB, simple VP8 or
    VP8L; JPEG: sequential Huffman-coded, as PIL writes it), have at most
    ``PIL.Image.MAX_IMAGE_PIXELS`` pixels and decode to no more bytes than its format can expand
    to from its size (``_MAX_EXPANSION_*``); all of this is checked before PIL allocates the image,
    so decoding memory and time are bounded by the payload's size.

    Not guarded: with ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True`` (a process-wide PIL setting)
    PIL pads a truncated payload instead of failing; records damaged that way still fail their CRC.

    Raises:
        CorruptRecordError: naming ``seq``, for any bytes that do not decode to such an image.
    """
    try:
        return _decode_image(data, int(encoding), height, width, channels)
    except MemoryError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, EOFError, struct.error...
        raise CorruptRecordError(seq, _reason(exc), path) from None


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


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
    return _pack_record(int(encoding), c, h, w, label, meta_bytes, encode_image(image, encoding, quality=quality, png_level=png_level))


def _pack_record(encoding: int, c: int, h: int, w: int, label: Label, meta_bytes: bytes, img: bytes) -> bytes:
    if isinstance(label, SoftLabel):
        packed = b"".join(_SOFT_PAIR.pack(cls, weight) for cls, weight in label.items())
        n_labels, flags = len(label), _FLAG_SOFT
    else:
        labels = [int(v) for v in label] if isinstance(label, (tuple, list)) else [int(label)]
        for v in labels:
            if not -(2**31) <= v < 2**31:
                raise ValueError(f"label {v} does not fit in int32")
        packed = struct.pack(f">{len(labels)}i", *labels)
        n_labels, flags = len(labels), (_FLAG_MULTILABEL if isinstance(label, (tuple, list)) else 0)
    body = packed + meta_bytes + img
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, encoding, c, flags, h, w, n_labels, len(meta_bytes), len(img), 0)
    crc = _crc32c(body, _crc32c(head[:_CRC_OFFSET]))
    return head[:_CRC_OFFSET] + struct.pack(">I", crc) + body


def relabel_record(buf, label: Label, meta_bytes: bytes, seq: Optional[int] = None, path=None) -> bytes:
    """Record value ``buf`` with a new label and metadata; the image bytes are kept as stored (no
    re-encoding, so a JPEG record loses nothing). The CRC is checked first.

    Raises:
        CorruptRecordError: ``buf`` is damaged.
    """
    try:
        _m, _v, enc, channels, flags, h, w, n_labels, meta_len, image_len, crc = _parse_header(buf)
        _check_crc(buf, crc)
        img_start = HEADER_SIZE + _label_bytes(n_labels, flags) + meta_len
        img = bytes(buf[img_start : img_start + image_len])
    except Exception as exc:
        raise CorruptRecordError(seq, _reason(exc), path) from None
    return _pack_record(enc, channels, h, w, label, meta_bytes, img)


def _parse_header(buf) -> Tuple:
    """The 11 header fields of a record value, checked; raises ``ValueError`` saying what is wrong.

    Beyond magic, version and total length, it refuses what no writer produces, so a header
    crafted to pass its CRC cannot describe something the decoders would misread: an unknown
    encoding code, channels other than 1 or 3, unknown flag bits, both flag bits at once, a zero
    height or width, a single-label record (no flag) without exactly one label, and a soft label
    without one. The pad bytes are ignored.
    """
    n = len(buf)
    if n < HEADER_SIZE:
        raise ValueError(f"value of {n} bytes is shorter than the {HEADER_SIZE}-byte header")
    fields = _HEADER.unpack_from(buf, 0)
    magic, version, enc, channels, flags, h, w, n_labels, meta_len, image_len, _crc = fields
    # one chain of constant-time tests on the hot path; _header_problem says which one failed
    if (
        magic != MAGIC
        or version != FORMAT_VERSION
        or enc > _MAX_ENCODING
        or (channels != 1 and channels != 3)
        or flags & ~_KNOWN_FLAGS
        or flags == _KNOWN_FLAGS
        or not h
        or not w
        or (n_labels != 1 and not flags)
        or (not n_labels and flags & _FLAG_SOFT)
        or n != HEADER_SIZE + (_SOFT_PAIR_SIZE if flags & _FLAG_SOFT else 4) * n_labels + meta_len + image_len  # _label_bytes, inlined
    ):
        raise ValueError(_header_problem(n, fields))
    return fields


def _header_problem(n: int, fields: Tuple) -> str:
    magic, version, enc, channels, flags, h, w, n_labels, meta_len, image_len, _crc = fields
    if magic != MAGIC:
        return f"bad magic {bytes(magic)!r} (expected {MAGIC!r})"
    if version > FORMAT_VERSION:
        return f"record format version {version} is newer than this synthaug ({FORMAT_VERSION}); upgrade synthaug"
    if version != FORMAT_VERSION:
        return f"unknown record format version {version} (this synthaug reads version {FORMAT_VERSION})"
    if enc > _MAX_ENCODING:
        return f"unknown encoding code {enc}"
    if channels not in (1, 3):
        return f"header says {channels} channels (1 or 3)"
    if flags & ~_KNOWN_FLAGS:
        return f"header has unknown flag bits 0x{flags & ~_KNOWN_FLAGS:02x}"
    if flags == _KNOWN_FLAGS:
        return "header says the label is both multi-label and soft"
    if not h or not w:
        return f"header says a {h}×{w} image"
    if n_labels != 1 and not flags:
        return f"single-label record holds {n_labels} labels"
    if not n_labels and flags & _FLAG_SOFT:
        return "soft label without a class"
    expected = HEADER_SIZE + _label_bytes(n_labels, flags) + meta_len + image_len
    return f"value holds {n} bytes, header says {expected}"


def read_header(buf, seq: Optional[int] = None, path=None) -> Tuple:
    """The header fields of a record value (bytes or memoryview), checked for consistency.

    Returns:
        ``(magic, version, encoding, channels, flags, height, width, n_labels, meta_len,
        image_len, crc32c)`` as ints (``magic`` bytes). The CRC is *not* verified here.

    Raises:
        CorruptRecordError: naming ``seq``, for a short value, bad magic, an unknown version,
            encoding, channel count or flag, a zero size, a label count that does not fit the
            flags, or a length other than the header's.
    """
    try:
        return _parse_header(buf)
    except Exception as exc:
        raise CorruptRecordError(seq, _reason(exc), path) from None


def _check_crc(buf, stored: int) -> None:
    actual = _crc32c(buf[HEADER_SIZE:], _crc32c(buf[:_CRC_OFFSET]))
    if actual != stored:
        raise ValueError(f"CRC-32C mismatch (stored {stored:08x}, computed {actual:08x})")


def _label_bytes(n_labels: int, flags: int) -> int:
    return (_SOFT_PAIR_SIZE if flags & _FLAG_SOFT else 4) * n_labels


def _labels_from(buf, n_labels: int, flags: int) -> Label:
    """The label region of a record whose header was checked; a soft label is validated (a
    record crafted to pass its CRC cannot hand out weights that are not a distribution)."""
    if n_labels == 1 and not flags:
        return _INT32.unpack_from(buf, HEADER_SIZE)[0]
    if flags & _FLAG_SOFT:
        label = SoftLabel([_SOFT_PAIR.unpack_from(buf, HEADER_SIZE + i * _SOFT_PAIR_SIZE) for i in range(n_labels)])
        if len(label) != n_labels:
            raise ValueError(f"soft label repeats a class ({n_labels} entries, {len(label)} classes)")
        return label
    return struct.unpack_from(f">{n_labels}i", buf, HEADER_SIZE)


_INT32 = struct.Struct(">i")


def decode_record(buf, seq: Optional[int] = None, *, check_crc: bool = True, path=None) -> Record:
    """A :class:`Record` from a record value (bytes or a memoryview valid for this call).

    ``check_crc=False`` skips only the CRC (the header and image are still checked, so even then
    bad bytes raise :class:`CorruptRecordError` rather than anything else, but damage that keeps
    the header consistent goes unnoticed). The metadata is parsed on first ``Record.meta`` access.

    Raises:
        CorruptRecordError: naming ``seq`` when the CRC, header or image is bad.
    """
    try:
        _m, _v, enc, channels, flags, h, w, n_labels, meta_len, image_len, crc = _parse_header(buf)
        meta_start = HEADER_SIZE + (_SOFT_PAIR_SIZE if flags & _FLAG_SOFT else 4) * n_labels  # _label_bytes, inlined (hot path)
        img_start = meta_start + meta_len
        if enc == 0:
            # raw: copy out of the map first, then checksum the copy while it is in CPU cache
            # (one pass over the mapped pages instead of two)
            if image_len != h * w * channels:
                raise ValueError(f"raw image holds {image_len} bytes, expected {h}×{w}×{channels} = {h * w * channels}")
            image = np.frombuffer(buf, np.uint8, image_len, img_start).reshape(h, w, channels).copy()
            if check_crc:
                actual = _crc32c(image, _crc32c(buf[HEADER_SIZE:img_start], _crc32c(buf[:_CRC_OFFSET])))
                if actual != crc:
                    raise ValueError(f"CRC-32C mismatch (stored {crc:08x}, computed {actual:08x})")
        else:
            if check_crc:
                _check_crc(buf, crc)
            image = _decode_image(buf[img_start:], enc, h, w, channels)  # the image runs to the end
        # one int label, the common case, without a call (_parse_header refused any other flag bit)
        label = _INT32.unpack_from(buf, HEADER_SIZE)[0] if n_labels == 1 and not flags else _labels_from(buf, n_labels, flags)
        meta_bytes = bytes(buf[meta_start:img_start])
    except MemoryError:
        # not a property of the bytes: the checks above bound every allocation by the value's
        # size, so this is the process running short, and calling a healthy record corrupt
        # would get it skipped or deleted
        raise
    except Exception as exc:  # any failure to read the bytes back is corruption of this record
        raise CorruptRecordError(seq, _reason(exc), path) from None
    return Record(seq, image, label, meta_bytes, path)


class RecordBatch:
    """Records read together (:meth:`SyntheticCache.read_batch`), their images in one array.

    Attributes:
        seqs: the records' sequence numbers, in the order asked for.
        images: a writable uint8 array N×H×W×C when every record has the same shape (the usual
            case: one generator fills a cache), else a list of N arrays H×W×C.
        labels: the N labels (int, tuple of ints, or :class:`SoftLabel`).
        meta_bytes: the N records' provenance as stored (compact UTF-8 JSON; ``None`` when read
            with ``with_meta=False``); :meth:`meta` parses one.
    """

    __slots__ = ("seqs", "images", "labels", "meta_bytes", "_path")

    def __init__(self, seqs: List[Optional[int]], images, labels: List[Label], meta_bytes: Optional[List[bytes]], path=None) -> None:
        self.seqs, self.images, self.labels, self.meta_bytes, self._path = seqs, images, labels, meta_bytes, path

    def __len__(self) -> int:
        return len(self.seqs)

    def meta(self, i: int) -> Dict[str, Any]:
        """The provenance dict of the ``i``-th record."""
        return _parse_meta(self._metas()[i], self.seqs[i], self._path)

    def records(self) -> List[Record]:
        """One :class:`Record` per record; their images are views of :attr:`images`."""
        return [Record(q, im, lab, mb, self._path) for q, im, lab, mb in zip(self.seqs, self.images, self.labels, self._metas())]

    def _metas(self) -> List[bytes]:
        if self.meta_bytes is None:
            raise ValueError("this batch was read with with_meta=False: it holds no provenance")
        return self.meta_bytes


# a raw image this large is copied out of the map first and checksummed in CPU cache (one pass
# over the mapped pages); a smaller record is checksummed on the map view in two calls, which
# costs less than the extra call (benchmarks/cache.py)
_CRC_AFTER_COPY = 1 << 16


def decode_batch(bufs: Sequence, seqs: Sequence[Optional[int]], *, out: Optional[np.ndarray] = None, check_crc: bool = True,
                 with_meta: bool = True, verified: Optional[Dict[int, int]] = None, path=None) -> RecordBatch:
    """A :class:`RecordBatch` from record values (bytes or memoryviews valid for this call).

    Every header is parsed and checked once; when all records share one shape their images are
    copied straight from the values into one N×H×W×C array (``out`` if given: C-contiguous uint8
    of that shape), raw images in a single copy each, the CRC computed on the value (large raw
    images: on the copy, while it is in CPU cache). The checks are those of :func:`decode_record`.
    ``with_meta=False`` leaves the provenance out (:attr:`RecordBatch.meta_bytes` is ``None``).
    ``verified`` (``{seq: crc}``, updated here) skips the CRC of a record already checked with
    the same stored CRC (``SyntheticCache(verify="once")``); the header checks still run.

    Raises:
        CorruptRecordError: naming the first record whose CRC, header or image is bad.
        ValueError: ``out`` has the wrong shape, dtype or layout.
    """
    n = len(bufs)
    heads = []
    i = 0
    try:
        for i in range(n):
            heads.append(_parse_header(bufs[i]))
        shape = (heads[0][5], heads[0][6], heads[0][3]) if n else (0, 0, 0)
        uniform = all(f[5] == shape[0] and f[6] == shape[1] and f[3] == shape[2] for f in heads)
    except Exception as exc:
        raise CorruptRecordError(seqs[i], _reason(exc), path) from None
    if not uniform:
        records = [decode_record(buf, seq, check_crc=check_crc, path=path) for buf, seq in zip(bufs, seqs)]
        return RecordBatch(list(seqs), [r.image for r in records], [r.label for r in records], [r._meta_bytes for r in records], path)
    size = shape[0] * shape[1] * shape[2]
    if out is None and size < _CRC_AFTER_COPY and all(f[2] == 0 for f in heads):
        return _decode_small_raw(bufs, seqs, heads, shape, check_crc, with_meta, verified, path)
    if out is None:
        images = np.empty((n, *shape), np.uint8)
    elif out.shape != (n, *shape) or out.dtype != np.uint8 or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writable C-contiguous uint8 array of shape {(n, *shape)}, got {out.dtype} {out.shape}")
    else:
        images = out
    flat = images.reshape(n, size)
    labels: List[Label] = []
    metas: List[bytes] = []
    crc = _crc32c
    unpack_label = _INT32.unpack_from
    try:
        for i in range(n):
            buf = bufs[i]
            _m, _v, enc, _c, flags, _h, _w, n_labels, meta_len, image_len, stored = heads[i]
            meta_start = HEADER_SIZE + (_SOFT_PAIR_SIZE if flags & _FLAG_SOFT else 4) * n_labels  # _label_bytes, inlined
            img_start = meta_start + meta_len
            if enc == 0:
                if image_len != size:
                    raise ValueError(f"raw image holds {image_len} bytes, expected {shape[0]}×{shape[1]}×{shape[2]} = {size}")
                row = flat[i]
                row[:] = np.frombuffer(buf, np.uint8, image_len, img_start)
                if check_crc and (verified is None or verified.get(seqs[i]) != stored):
                    actual = crc(row, crc(buf[HEADER_SIZE:img_start], crc(buf[:_CRC_OFFSET])))
                    if actual != stored:
                        raise ValueError(f"CRC-32C mismatch (stored {stored:08x}, computed {actual:08x})")
                    if verified is not None:
                        _remember(verified, seqs[i], stored)
            else:
                if check_crc and (verified is None or verified.get(seqs[i]) != stored):
                    _check_crc(buf, stored)
                    if verified is not None:
                        _remember(verified, seqs[i], stored)
                flat[i] = _decode_image(buf[img_start:], enc, *shape).reshape(size)
            labels.append(unpack_label(buf, HEADER_SIZE)[0] if n_labels == 1 and not flags else _labels_from(buf, n_labels, flags))
            if with_meta:
                metas.append(bytes(buf[meta_start:img_start]))
    except MemoryError:
        raise  # the process running short, not the record (see decode_record)
    except Exception as exc:
        raise CorruptRecordError(seqs[i], _reason(exc), path) from None
    return RecordBatch(list(seqs), images, labels, metas if with_meta else None, path)


def _remember(verified: Dict[int, int], seq: int, crc: int) -> None:
    if len(verified) >= _VERIFIED_MAX:
        verified.clear()  # bounded memory: those records are checked again on their next read
    verified[seq] = crc


_VERIFIED_MAX = 1 << 20


def _decode_small_raw(bufs, seqs, heads, shape, check_crc: bool, with_meta: bool, verified, path) -> RecordBatch:
    """:func:`decode_batch` for small raw images of one shape: each value's CRC on the map view,
    the images joined straight into one buffer (one copy each, no per-row array)."""
    size = shape[0] * shape[1] * shape[2]
    crc, unpack_label = _crc32c, _INT32.unpack_from
    pieces, labels, metas = [], [], []
    i = 0
    try:
        for i in range(len(bufs)):
            buf = bufs[i]
            _m, _v, _e, _c, flags, _h, _w, n_labels, meta_len, image_len, stored = heads[i]
            if image_len != size:
                raise ValueError(f"raw image holds {image_len} bytes, expected {shape[0]}×{shape[1]}×{shape[2]} = {size}")
            if check_crc and (verified is None or verified.get(seqs[i]) != stored):
                actual = crc(buf[HEADER_SIZE:], crc(buf[:_CRC_OFFSET]))
                if actual != stored:
                    raise ValueError(f"CRC-32C mismatch (stored {stored:08x}, computed {actual:08x})")
                if verified is not None:
                    _remember(verified, seqs[i], stored)
            img_start = len(buf) - image_len  # the image runs to the end (_parse_header checked the length)
            pieces.append(buf[img_start:])
            labels.append(unpack_label(buf, HEADER_SIZE)[0] if n_labels == 1 and not flags else _labels_from(buf, n_labels, flags))
            if with_meta:
                metas.append(bytes(buf[img_start - meta_len : img_start]))
        images = np.frombuffer(bytearray().join(pieces), np.uint8).reshape(len(bufs), *shape)
    except MemoryError:
        raise
    except Exception as exc:
        raise CorruptRecordError(seqs[i], _reason(exc), path) from None
    return RecordBatch(list(seqs), images, labels, metas if with_meta else None, path)


def peek_label(buf, seq: Optional[int] = None, path=None, *, check_crc: bool = True) -> Label:
    """The label of a record value without decoding its image: an int, a tuple of ints for a
    multi-label record, or a :class:`SoftLabel`.

    The CRC is checked by default (a flipped label byte would otherwise route a record to the
    wrong class); CRC-32C runs at memory speed, so this stays far cheaper than decoding.

    Raises:
        CorruptRecordError: naming ``seq``, for a bad header or CRC.
    """
    try:
        fields = _parse_header(buf)
        if check_crc:
            _check_crc(buf, fields[10])
        return _labels_from(buf, fields[7], fields[4])
    except Exception as exc:
        raise CorruptRecordError(seq, _reason(exc), path) from None


def peek_meta(buf, seq: Optional[int] = None, path=None, *, check_crc: bool = True) -> Dict[str, Any]:
    """The provenance dict of a record value without decoding its image.

    The CRC is checked by default, as in :func:`peek_label`: provenance (seeds, model, prompt)
    is what reports and deduplication trust, so a flipped byte must not silently change it, and
    CRC-32C costs far less than the JSON parse. ``check_crc=False`` skips it (bad bytes still
    raise :class:`CorruptRecordError`, never a JSON or Unicode error).

    Raises:
        CorruptRecordError: naming ``seq``, for a bad header or CRC, or metadata that is not a
            UTF-8 JSON object.
    """
    try:
        fields = _parse_header(buf)
        if check_crc:
            _check_crc(buf, fields[10])
    except Exception as exc:
        raise CorruptRecordError(seq, _reason(exc), path) from None
    start = HEADER_SIZE + _label_bytes(fields[7], fields[4])
    return _parse_meta(buf[start : start + fields[8]], seq, path)


def as_image_batch(images) -> List[np.ndarray]:
    """Normalize what ``SyntheticCache.append`` accepts into a list of uint8 H×W×C arrays (C = 1
    or 3), one per image.

    Accepted:

    * a uint8 numpy array N×H×W×C (C = 1 or 3), or N×H×W (N gray images) when W is not 1 or 3;
    * a uint8 torch tensor N×C×H×W (torchvision's layout), or N×H×W (N gray images) when N is
      not 3 and W is not 1 or 3;
    * a sequence of images, each a PIL image, an H×W×C or H×W numpy array, or a C×H×W or H×W
      tensor.

    A single image is always passed with a batch axis (``image[None]``) or in a list: a 3-D array
    or tensor is read as a batch, so shapes that look like one image are refused rather than
    silently stored as a stack of thin gray images. Refused as ambiguous: a numpy N×H×W array
    whose last axis is 1 or 3 (it looks like one H×W×C image), and a 3-D tensor whose first axis is
    3 (one RGB C×H×W image, or three gray H×W images?) or whose last axis is 1 or 3 (an H×W×C
    image converted with ``torch.from_numpy``). A 1×H×W tensor (W not 1 or 3) is one gray H×W
    image whichever way it is read (one C×H×W image with C = 1, or a batch of one H×W image), so it
    is accepted.

    Raises:
        ValueError: naming the input's shape or type and what to pass instead.
    """
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            if images.shape[2] in (1, 3):
                raise ValueError(
                    f"images array has shape {images.shape}, which looks like one H×W×C image, not a batch of "
                    f"{images.shape[0]} gray {images.shape[1]}×{images.shape[2]} images; pass images[None] for a "
                    "batch of one, or an N×H×W×C array (N gray images of width 1 or 3: images[..., None])"
                )
            images = images[..., None]
        if images.ndim != 4:
            hint = "; pass images[None] for a single image" if images.ndim == 2 else ""
            raise ValueError(f"images array must be N×H×W×C or N×H×W, got shape {images.shape}{hint}")
        if len(images):
            _check_image(images[0], 0)  # one array: every image has the first one's dtype and shape
        return list(images)
    if _is_tensor(images):
        if images.ndim == 3:
            shape = tuple(images.shape)
            if shape[0] == 3:
                raise ValueError(
                    f"images tensor has shape {shape}: one RGB C×H×W image or three gray H×W images? Pass an "
                    "N×C×H×W tensor: images[None] for one RGB image, images[:, None] for three gray images"
                )
            if shape[2] in (1, 3):
                raise ValueError(
                    f"images tensor has shape {shape}, which looks like one H×W×C image; tensors are N×C×H×W "
                    "(torchvision layout): pass images.permute(2, 0, 1)[None] for one image, or images[:, None] "
                    f"for {shape[0]} gray images of width {shape[2]}"
                )
            images = images[:, None]
        if images.ndim != 4:
            hint = "; pass images[None, None] for a single gray image" if images.ndim == 2 else ""
            raise ValueError(f"images tensor must be N×C×H×W or N×H×W, got shape {tuple(images.shape)}{hint}")
        return [_check_image(im, i) for i, im in enumerate(images)]
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise ValueError(
            f"images must be a uint8 array N×H×W×C, a uint8 tensor N×C×H×W or a list of images; got {type(images).__name__}"
        )
    return [_check_image(im, i) for i, im in enumerate(images)]


def _is_tensor(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "numpy")


def _check_image(im, i: int) -> np.ndarray:
    """Image ``i`` of a batch as uint8 H×W×C (:func:`synthaug.imaging.to_hwc_uint8`) of a size a
    record can hold."""
    im = to_hwc_uint8(im, name=f"image {i}")
    if not (0 < im.shape[0] < 65536 and 0 < im.shape[1] < 65536):
        raise ValueError(f"image {i} has unsupported size {im.shape[:2]}")
    return im


def as_labels(labels, n: int, names: Optional[Callable[[], Optional[Sequence[str]]]] = None) -> List[Label]:
    """One label per image: an int, a list/tuple of ints (multi-label), or a mapping
    ``{class: weight}`` (a :class:`SoftLabel`; classes as indices, or as names among ``names()``,
    the cache's label names, read only when a name is met). A single int or mapping is broadcast
    to all ``n`` images."""
    if isinstance(labels, (int, np.integer)) and not isinstance(labels, bool):
        return [int(labels)] * n
    if isinstance(labels, Mapping):
        return [_soft_label(labels, 0, names)] * n
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
        if isinstance(lab, Mapping):
            out.append(_soft_label(lab, i, names))
        elif isinstance(lab, (list, tuple)):
            if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in lab):
                raise ValueError(f"label {i} ({lab!r}) must be an int or a list of ints")
            out.append(tuple(int(v) for v in lab))
        elif isinstance(lab, (int, np.integer)) and not isinstance(lab, bool):
            out.append(int(lab))
        elif isinstance(lab, float) and math.isfinite(lab) and lab == int(lab):
            out.append(int(lab))
        else:
            raise ValueError(f"label {i} ({lab!r}) must be an int, a list of ints or a soft label {{class: weight}}")
    return out


def _soft_label(mapping: Mapping, i: int, names: Optional[Callable[[], Optional[Sequence[str]]]]) -> SoftLabel:
    """Label ``i`` given as ``{class: weight}``; class names resolved through ``names()``."""
    resolved = {}
    for cls, w in mapping.items():
        if isinstance(cls, str):
            names = names() if callable(names) else names
            if not names or cls not in names:
                known = f"the cache's label names are {list(names)}" if names else "the cache has no label names (SyntheticCache(..., label_names=...))"
                raise ValueError(f"label {i} names class {cls!r}, which cannot be resolved: {known}")
            cls = list(names).index(cls)
        resolved[cls] = w
    try:
        return SoftLabel(resolved)
    except ValueError as exc:
        raise ValueError(f"label {i}: {exc}") from None


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
