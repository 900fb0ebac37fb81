"""The record codec against bad bytes, and the image-batch shapes ``SyntheticCache.append`` takes.

Property tests (hypothesis) feed the readers (``decode_record``, ``peek_label``, ``peek_meta``,
``read_header``, ``Record.meta``) random bytes and mutated valid records of every encoding, and
check that they never raise anything but ``CorruptRecordError``, never hang, never let PIL see a
payload whose size the header did not declare, and never return an image other than what the
(possibly mutated) header and payload say. Example tests craft the hard cases by hand:
decompression bombs, payloads of the wrong format or pixel format, bad metadata.
"""

from __future__ import annotations

import io
import json
import os
import struct
import time
import warnings
import zlib
from contextlib import contextmanager
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import pytest
from crc32c import crc32c
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from synthaug import SyntheticCache
from synthaug.cache import codec
from synthaug.cache.codec import HEADER_SIZE, Encoding, decode_image, decode_record, peek_label, peek_meta, read_header
from synthaug.errors import CorruptRecordError

# a hang fails the test instead of stalling the suite (setup.cfg's default is 900 s)
pytestmark = pytest.mark.timeout(120)

HEADER = struct.Struct(">4sBBBBHHH2xIII")  # the documented layout, restated independently of codec
FIELDS = ("magic", "version", "encoding", "channels", "flags", "height", "width", "n_labels", "meta_len", "image_len", "crc")
PIL_NAME = {1: "PNG", 2: "JPEG", 3: "WEBP"}
# SYNTHAUG_CODEC_EXAMPLES=5000 fuzzes longer (the defaults keep this file at a few seconds)
EXAMPLES = int(os.environ.get("SYNTHAUG_CODEC_EXAMPLES", "0"))
PROPERTY = settings(
    max_examples=EXAMPLES or 300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ------------------------------------------------------------------------------- helpers
def header_of(value: bytes) -> Optional[Dict[str, Any]]:
    if len(value) < HEADER_SIZE:
        return None
    return dict(zip(FIELDS, HEADER.unpack_from(value, 0)))


def computed_crc(value: bytes) -> int:
    return crc32c(value[HEADER_SIZE:], crc32c(value[:24]))


def crc_ok(value: bytes) -> bool:
    return len(value) >= HEADER_SIZE and header_of(value)["crc"] == computed_crc(value)


def with_crc(value: bytes) -> bytes:
    """``value`` with its CRC field recomputed, so only the decoder's own checks can refuse it."""
    if len(value) < HEADER_SIZE:
        return value
    return value[:24] + struct.pack(">I", computed_crc(value)) + value[HEADER_SIZE:]


def rewrite(value: bytes, **fields: int) -> bytes:
    """``value`` with header fields replaced and the CRC recomputed."""
    h = header_of(value)
    h.update(fields)
    head = HEADER.pack(*(h[f] for f in FIELDS))
    return with_crc(head + value[HEADER_SIZE:])


def label_bytes(h: Dict[str, Any]) -> int:
    """Bytes of the label region: 4 per int label, 12 per (class, weight) of a soft label."""
    return (12 if h["flags"] & 2 else 4) * h["n_labels"]


def payload_of(value: bytes) -> bytes:
    h = header_of(value)
    return value[HEADER_SIZE + label_bytes(h) + h["meta_len"] :]


def try_call(fn, *args, **kwargs):
    """``fn``'s result, or ``None`` for ``CorruptRecordError``; anything else fails the test."""
    try:
        return fn(*args, **kwargs)
    except CorruptRecordError as exc:
        assert exc.reason and isinstance(exc.reason, str)
        return None


@contextmanager
def pil_spy():
    """Records ``(format, size)`` of every file PIL opens inside the block."""
    opened: List[Tuple[str, Tuple[int, int]]] = []
    real_open = Image.open

    def spy(fp, *args, **kwargs):
        im = real_open(fp, *args, **kwargs)
        opened.append((im.format, im.size))
        return im

    Image.open = spy
    try:
        yield opened
    finally:
        Image.open = real_open


def reference_image(payload: bytes, encoding: int, channels: int) -> np.ndarray:
    """What PIL itself decodes a payload to (no synthaug code involved)."""
    if encoding == 0:
        return np.frombuffer(payload, np.uint8)
    with Image.open(io.BytesIO(payload)) as pil:
        arr = np.asarray(pil.convert("L" if channels == 1 else "RGB"))
    return arr[:, :, None] if arr.ndim == 2 else arr


INVALID = object()  # a label region that holds no valid label (soft weights that are no distribution)


def expected_label(value: bytes):
    h = header_of(value)
    if h["flags"] & 2:
        pairs = [struct.unpack_from(">id", value, HEADER_SIZE + 12 * i) for i in range(h["n_labels"])]
        if len({c for c, _ in pairs}) < len(pairs):
            return INVALID  # a repeated class: the dict would hide an entry, so the sum tells
        try:
            return codec.SoftLabel(pairs)
        except ValueError:
            return INVALID
    labels = struct.unpack_from(f">{h['n_labels']}i", value, HEADER_SIZE)
    return labels if h["flags"] & 1 else labels[0]


def expected_meta(value: bytes) -> Optional[Dict[str, Any]]:
    """The metadata the header and bytes describe, or ``None`` if they are not a JSON object."""
    h = header_of(value)
    start = HEADER_SIZE + label_bytes(h)
    raw = value[start : start + h["meta_len"]]
    if not raw:
        return {}
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    return meta if isinstance(meta, dict) else None


def check_every_reader(value: bytes) -> None:
    """Run every reader on ``value`` (as bytes and as a memoryview, with and without the CRC
    check) and check what each returns against what the bytes say."""
    h = header_of(value)
    for buf in (value, memoryview(value)):
        with pil_spy() as opened:
            recs = {check: try_call(decode_record, buf, 7, check_crc=check) for check in (True, False)}
            label = try_call(peek_label, buf, 7)
            label_nocrc = try_call(peek_label, buf, 7, check_crc=False)
            meta = try_call(peek_meta, buf, 7)
            meta_nocrc = try_call(peek_meta, buf, 7, check_crc=False)
            fields = try_call(read_header, buf, 7)
        # PIL only ever sees a payload of the format, and the size, the header declares
        for fmt, size in opened:
            assert h is not None and fmt == PIL_NAME.get(h["encoding"]) and size == (h["width"], h["height"])
        if buf is value:  # what the run covered: --hypothesis-show-statistics
            enc = PIL_NAME.get(h["encoding"], "raw" if h["encoding"] == 0 else "?") if h else "short"
            event(f"{enc}: {'decoded' if recs[False] is not None else 'refused'}{'' if crc_ok(value) else ', bad CRC'}")
        if not crc_ok(value):  # (d): a broken CRC is always found
            assert recs[True] is None and label is None and meta is None
        if fields is not None:
            assert fields == tuple(h[f] for f in FIELDS)
        for check, rec in recs.items():
            if rec is None:
                continue
            # (e): a returned record is exactly what the header and payload say
            assert fields is not None and (crc_ok(value) or not check)
            assert rec.seq == 7
            assert rec.image.dtype == np.uint8 and rec.image.flags.writeable
            assert rec.image.shape == (h["height"], h["width"], h["channels"])
            payload = payload_of(value)
            assert len(payload) == h["image_len"]
            ref = reference_image(payload, h["encoding"], h["channels"])
            if h["encoding"] == 0:
                assert rec.image.tobytes() == payload
            else:
                np.testing.assert_array_equal(rec.image, ref)
            assert rec.label == expected_label(value)
            want_meta = expected_meta(value)
            got_meta = try_call(lambda: rec.meta)
            assert got_meta == want_meta
        for lab, check in ((label, True), (label_nocrc, False)):
            if lab is not None:
                assert fields is not None and (crc_ok(value) or not check)
                assert lab == expected_label(value)
        for m, check in ((meta, True), (meta_nocrc, False)):
            if m is not None:
                assert fields is not None and (crc_ok(value) or not check)
                assert m == expected_meta(value)
        if fields is None:  # a header the codec refuses is refused by every reader
            assert all(r is None for r in (*recs.values(), label, label_nocrc, meta, meta_nocrc))
        else:  # and what the header and bytes do describe is not refused
            label_ok = expected_label(value) is not INVALID
            assert (label_nocrc is not None) == label_ok and (label is not None) == (label_ok and crc_ok(value))
            if expected_meta(value) is not None:
                assert meta_nocrc is not None and (meta is not None) == crc_ok(value)
            if h["encoding"] == 0 and h["image_len"] == h["height"] * h["width"] * h["channels"]:
                assert (recs[False] is not None) == label_ok and (recs[True] is not None) == (label_ok and crc_ok(value))


# ------------------------------------------------------------------------------- strategies
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12)
)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
metas = st.dictionaries(st.text(max_size=10), json_values, max_size=4)


def _distribution(weights: Dict[int, float]) -> "codec.SoftLabel":
    total = sum(weights.values())
    return codec.SoftLabel({k: v / total for k, v in weights.items()})


soft_labels = st.dictionaries(st.integers(0, 2**31 - 1), st.floats(1e-3, 1.0), min_size=1, max_size=4).map(_distribution)
labels = st.one_of(st.integers(-(2**31), 2**31 - 1), st.lists(st.integers(-(2**31), 2**31 - 1), max_size=5), soft_labels)


class Sample(NamedTuple):
    value: bytes
    image: np.ndarray
    label: Any
    meta: Dict[str, Any]
    encoding: Encoding


def make_image(h: int, w: int, c: int, seed: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    if kind == "flat":
        return np.full((h, w, c), rng.integers(0, 256), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(xx * 7 + yy * 3 + 40 * k) % 256 for k in range(c)], axis=-1).astype(np.uint8)


@st.composite
def samples(draw, encodings=tuple(Encoding)) -> Sample:
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    c = draw(st.sampled_from([1, 3]))
    image = make_image(h, w, c, draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from(["noise", "flat", "gradient"])))
    label, meta = draw(labels), draw(metas)
    enc = draw(st.sampled_from(encodings))
    value = codec.encode_record(image, label, codec.encode_meta(meta), enc, quality=draw(st.sampled_from([50, 95])))
    return Sample(value, image, label, meta, enc)


def _field_values(name: str, h: Dict[str, Any]) -> st.SearchStrategy:
    old = h[name]
    common = [0, 1, 2, 3, 4, 255, old - 1, old + 1]
    if name in ("height", "width", "n_labels"):
        extra = [65535, 65534, h["height"], h["width"]]
        return st.sampled_from(common + extra).filter(lambda v: 0 <= v <= 65535) | st.integers(0, 65535)
    if name in ("meta_len", "image_len"):
        extra = [2**32 - 1, 2**31, old * 2, old // 2]
        return st.sampled_from(common + extra).filter(lambda v: 0 <= v < 2**32) | st.integers(0, 2**32 - 1)
    return st.sampled_from(common).filter(lambda v: 0 <= v <= 255) | st.integers(0, 255)


@st.composite
def header_rewrites(draw, value: bytes) -> bytes:
    """Rewrite header fields (CRC recomputed), optionally resizing the body to the new lengths so
    the value reaches the decoders: the case where only the decoder's own checks stand."""
    h = header_of(value)
    how = draw(st.sampled_from(["fields", "shift", "reshape", "fields"]))
    new: Dict[str, int] = {}
    if how == "fields":
        for name in draw(st.lists(st.sampled_from(FIELDS[1:10]), min_size=1, max_size=4, unique=True)):
            new[name] = draw(_field_values(name, h))
    elif how == "shift":  # move the meta/image boundary, same total
        k = draw(st.integers(-h["meta_len"], h["image_len"]))
        new = {"meta_len": h["meta_len"] + k, "image_len": h["image_len"] - k}
    else:  # another height/width (and channel count) with the same pixel bytes
        total = h["height"] * h["width"] * h["channels"]
        c = draw(st.sampled_from([1, 3]))
        divisors = [d for d in range(1, min(total, 65535) + 1) if total % (d * c) == 0 and total // (d * c) <= 65535]
        assume(divisors)
        hh = draw(st.sampled_from(divisors))
        new = {"height": hh, "width": total // (hh * c), "channels": c}
    out = rewrite(value, **new)
    if draw(st.booleans()):  # make the total length match the new header
        n = header_of(out)
        want = HEADER_SIZE + label_bytes(n) + n["meta_len"] + n["image_len"]
        if want <= len(out) + 4096:
            body = out[HEADER_SIZE:want] + bytes(max(0, want - len(out)))
            out = with_crc(out[:HEADER_SIZE] + body)
    return out


@st.composite
def mutations(draw, value: bytes) -> Tuple[str, bytes]:
    kind = draw(st.sampled_from(["flip", "overwrite", "truncate", "extend", "splice", "header", "body+crc", "resize+crc"]))
    n = len(value)
    if kind == "flip":
        out = bytearray(value)
        for pos in draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=8)):
            out[pos] ^= 1 << draw(st.integers(0, 7))
        return kind, bytes(out)
    if kind == "overwrite":
        out = bytearray(value)
        for pos in draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=8)):
            out[pos] = draw(st.integers(0, 255))
        return kind, bytes(out)
    if kind == "truncate":
        return kind, value[: draw(st.integers(0, n - 1))]
    if kind == "extend":
        return kind, value + draw(st.binary(min_size=1, max_size=64))
    if kind == "splice":
        other = draw(samples()).value
        return kind, value[: draw(st.integers(0, n))] + other[draw(st.integers(0, len(other))) :]
    if kind == "header":
        return kind, draw(header_rewrites(value))
    if kind == "body+crc":  # damage labels/meta/image, then make the CRC agree: the decoders must cope
        out = bytearray(value)
        for pos in draw(st.lists(st.integers(HEADER_SIZE, max(HEADER_SIZE, n - 1)), min_size=1, max_size=6)):
            if pos < n:
                out[pos] = draw(st.integers(0, 255)) if draw(st.booleans()) else out[pos] ^ (1 << draw(st.integers(0, 7)))
        return kind, with_crc(bytes(out))
    # resize+crc: insert or delete bytes inside the body, fix the length fields and the CRC
    h = header_of(value)
    meta_start = HEADER_SIZE + label_bytes(h)
    img_start = meta_start + h["meta_len"]
    pos = draw(st.integers(meta_start, n))
    delete = draw(st.integers(0, min(16, n - pos)))
    insert = draw(st.binary(max_size=16))
    out = value[:pos] + insert + value[pos + delete :]
    delta = len(insert) - delete
    field = "meta_len" if pos < img_start else "image_len"
    return kind, rewrite(out, **{field: max(0, h[field] + delta)})


@st.composite
def header_prefixed_bytes(draw) -> bytes:
    """A header with random fields (valid magic and mostly the right version), then random bytes,
    lengths and CRC often made consistent; the payload often opens like a PNG, JPEG or WebP."""
    enc = draw(st.integers(0, 4))
    fields = {
        "magic": b"SAUG",
        "version": draw(st.sampled_from([1, 1, 1, 0, 2])),
        "encoding": enc,
        "channels": draw(st.sampled_from([1, 3, 1, 3, 0, 2, 4])),
        "flags": draw(st.sampled_from([0, 1, 0, 1, 2, 2, 3, 255])),
        "height": draw(st.sampled_from([1, 2, 8, 0, 65535]) | st.integers(0, 65535)),
        "width": draw(st.sampled_from([1, 3, 8, 0, 65535]) | st.integers(0, 65535)),
        "n_labels": draw(st.sampled_from([1, 0, 2, 3])),
    }
    meta = draw(st.one_of(st.binary(max_size=24), st.just(b'{"a":1}'), st.just(b"[1,2]"), st.just(b"\xff\xfe{\x00}\x00")))
    starts = [b"", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"\xff\xd8\xff", b"\xff\xd8\xff\xc0\x00\x11\x08", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"RIFF\x00\x00\x00\x00WEBPVP8L"]
    image = draw(st.sampled_from(starts)) + draw(st.binary(max_size=96))
    if enc == 0 and image and draw(st.booleans()):  # a raw image the random bytes fill exactly
        fields.update(channels=1, height=1, width=len(image))
    n_label_bytes = label_bytes(fields)
    if fields["flags"] == 2 and draw(st.booleans()):  # a soft label that is a distribution, or nearly
        weights = draw(st.lists(st.floats(1e-3, 1.0), min_size=fields["n_labels"], max_size=fields["n_labels"]))
        total = sum(weights) or 1.0
        label_region = b"".join(struct.pack(">id", draw(st.integers(0, 2**31 - 1)), w / total * draw(st.sampled_from([1.0, 1.0, 1.1, -1.0])))
                                for w in weights)
    else:
        label_region = draw(st.binary(min_size=n_label_bytes, max_size=n_label_bytes))
    body = label_region + meta + image
    consistent = draw(st.booleans())
    fields["meta_len"] = len(meta) if consistent else draw(st.integers(0, 2**32 - 1))
    fields["image_len"] = len(image) if consistent else draw(st.integers(0, 2**32 - 1))
    fields["crc"] = draw(st.integers(0, 2**32 - 1))
    value = HEADER.pack(*(fields[f] for f in FIELDS)) + body
    if draw(st.booleans()):
        value = with_crc(value)
    return value[: draw(st.integers(0, len(value)))] if draw(st.integers(0, 9)) == 0 else value


# ------------------------------------------------------------------------------- properties
@PROPERTY
@given(data=st.binary(max_size=256))
def test_random_bytes_raise_only_corrupt_record_error(data):
    check_every_reader(data)


@PROPERTY
@given(data=header_prefixed_bytes())
def test_bytes_behind_a_valid_header_prefix_raise_only_corrupt_record_error(data):
    check_every_reader(data)


@settings(max_examples=EXAMPLES or 200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sample=samples())
def test_valid_records_round_trip(sample):
    """(c): every encoding, 1 or 3 channels, single, multi and soft labels, with meta."""
    value, image, label, meta, enc = sample
    want_label = tuple(label) if isinstance(label, list) else label
    for buf in (value, memoryview(value)):
        rec = decode_record(buf, 3)
        assert rec.seq == 3 and rec.image.dtype == np.uint8 and rec.image.flags.writeable
        assert rec.image.shape == image.shape
        if enc in (Encoding.raw, Encoding.png):
            np.testing.assert_array_equal(rec.image, image)
        else:
            np.testing.assert_array_equal(rec.image, reference_image(payload_of(value), int(enc), image.shape[2]))
        assert rec.label == want_label and peek_label(buf, 3) == want_label  # (d)
        assert rec.meta == meta and peek_meta(buf, 3) == meta
        flags = 2 if isinstance(label, codec.SoftLabel) else int(isinstance(label, list))
        assert read_header(buf)[:8] == (b"SAUG", codec.FORMAT_VERSION, int(enc), image.shape[2], flags, *image.shape[:2], len(label) if isinstance(label, (list, dict)) else 1)
    check_every_reader(value)


@settings(PROPERTY, max_examples=EXAMPLES or 600)
@given(data=st.data(), sample=samples())
def test_mutated_records_raise_only_corrupt_record_error_and_never_give_a_wrong_image(data, sample):
    """(b), (d), (e): flips, overwrites, truncation, extension, splices, header rewrites with the
    CRC recomputed, body damage with the CRC recomputed."""
    kind, value = data.draw(mutations(sample.value), label="mutation")
    assume(value != sample.value)
    event(f"mutation {kind}")
    check_every_reader(value)
    if kind in ("flip", "overwrite", "truncate", "extend"):  # what CRC-32C is there to find
        assert not crc_ok(value)
        with pytest.raises(CorruptRecordError, match=r"seq=5\b"):
            decode_record(value, 5)


@settings(max_examples=EXAMPLES or 100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sample=samples(encodings=(Encoding.raw,)), data=st.data())
def test_raw_records_reshaped_by_a_crafted_header_are_the_payload_reshaped(sample, data):
    """A header rewritten to another H×W×C with the same byte count (CRC recomputed) is a valid
    record: it must decode to exactly the payload bytes in that shape, nothing else."""
    h = header_of(sample.value)
    total = h["height"] * h["width"] * h["channels"]
    c = data.draw(st.sampled_from([c for c in (1, 3) if total % c == 0]))
    hh = data.draw(st.sampled_from([d for d in range(1, total // c + 1) if (total // c) % d == 0 and (total // c) // d <= 65535 and d <= 65535]))
    value = rewrite(sample.value, height=hh, width=total // (c * hh), channels=c)
    rec = decode_record(value)
    assert rec.image.shape == (hh, total // (c * hh), c)
    assert rec.image.tobytes() == sample.image.tobytes()


# ------------------------------------------------------------------------------- crafted cases
def small_record(encoding: Encoding, c: int = 1, size: Tuple[int, int] = (4, 5), image: Optional[np.ndarray] = None) -> bytes:
    if image is None:
        image = make_image(size[0], size[1], c, 0, "gradient")
    return codec.encode_record(image, 1, b'{"k":1}', encoding)


def with_payload(value: bytes, payload: bytes, **fields: int) -> bytes:
    """``value`` with its image bytes replaced (and header fields set), CRC recomputed."""
    h = header_of(value)
    start = HEADER_SIZE + label_bytes(h) + h["meta_len"]
    return rewrite(value[:start] + payload, image_len=len(payload), **fields)


def png_file(width: int, height: int, idat: bytes, color: int = 0, depth: int = 8) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def pil_bytes(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def refused(value: bytes, match: Optional[str] = None) -> CorruptRecordError:
    """``value`` is refused by decode_record without PIL opening anything, quickly, warning-free."""
    with pil_spy() as opened, warnings.catch_warnings():
        warnings.simplefilter("error")
        t0 = time.perf_counter()
        with pytest.raises(CorruptRecordError, match=match) as err:
            decode_record(value, 11)
        elapsed = time.perf_counter() - t0
    assert opened == [], f"PIL opened {opened} before the record was refused"
    assert elapsed < 1.0 and err.value.seq == 11
    return err.value


@pytest.mark.parametrize("encoding", list(Encoding))
@pytest.mark.parametrize("c", [1, 3])
def test_huge_header_with_a_tiny_payload_is_refused_before_allocating(encoding, c):
    value = small_record(encoding, c)
    for h, w in [(65535, 65535), (9000, 9000), (4096, 65535), (1, 65535)]:
        refused(rewrite(value, height=h, width=w))  # lengths left as they are
        if encoding is Encoding.raw:
            refused(rewrite(value, height=h, width=w, image_len=min(h * w * c, 2**32 - 1)), "bytes")


def test_png_bomb_claiming_more_than_deflate_can_hold_is_refused_before_pil():
    """A PNG claiming 9000×9000 (between MAX_IMAGE_PIXELS and twice it, where PIL itself only
    warns and decodes) from a few hundred bytes: refused before PIL sees it, with the header
    agreeing with the PNG (the CRC cannot help)."""
    bomb = png_file(9000, 9000, zlib.compress(bytes(90_001), 9))
    value = with_payload(small_record(Encoding.png), bomb, height=9000, width=9000)
    assert "expansion" in refused(value).reason
    huge = png_file(65535, 65535, zlib.compress(bytes(1000), 9))
    refused(with_payload(small_record(Encoding.png, 3), huge, height=65535, width=65535, channels=3), "MAX_IMAGE_PIXELS")


def test_a_real_maximally_compressed_png_is_not_mistaken_for_a_bomb():
    image = np.zeros((1500, 1500, 1), np.uint8)
    png = pil_bytes(Image.fromarray(image[:, :, 0]), "PNG", compress_level=9)
    assert 1500 * 1500 / len(png) > 900  # deflate near its 1032:1 limit
    value = with_payload(small_record(Encoding.png), png, height=1500, width=1500)
    np.testing.assert_array_equal(decode_record(value).image, image)


def test_jpeg_bombs_and_unusual_jpegs_are_refused_before_pil():
    jpeg = pil_bytes(Image.fromarray(np.full((8, 8, 3), 90, np.uint8)), "JPEG", quality=90)
    sof = jpeg.index(b"\xff\xc0")
    big = jpeg[: sof + 5] + struct.pack(">HH", 9000, 9000) + jpeg[sof + 9 :]
    base = small_record(Encoding.jpeg, 3)
    assert "expansion" in refused(with_payload(base, big, height=9000, width=9000)).reason
    refused(with_payload(base, big, height=8, width=8), "payload is 9000×9000")
    gray = Image.fromarray(np.full((16, 16), 90, np.uint8))
    progressive = pil_bytes(gray, "JPEG", progressive=True)
    refused(with_payload(base, progressive, height=16, width=16, channels=1), "SOF2")
    cmyk = pil_bytes(Image.new("CMYK", (16, 16), (1, 2, 3, 4)), "JPEG")
    refused(with_payload(base, cmyk, height=16, width=16, channels=3), "components=4")
    refused(with_payload(base, pil_bytes(gray, "JPEG"), height=16, width=16, channels=3), "components=1")
    # a real, very compressible JPEG is fine
    flat = np.zeros((512, 512, 3), np.uint8)
    value = with_payload(base, pil_bytes(Image.fromarray(flat), "JPEG", quality=95), height=512, width=512)
    assert decode_record(value).image.shape == (512, 512, 3)


def test_webp_bombs_and_extended_webp_are_refused_before_pil():
    base = small_record(Encoding.webp, 3)
    webp = payload_of(base)
    assert webp[12:16] == b"VP8 "
    for side, match in [(16383, "MAX_IMAGE_PIXELS"), (6000, "expansion")]:
        big = webp[:26] + struct.pack("<HH", side, side) + webp[30:]
        refused(with_payload(base, big, height=side, width=side), match)
    rgba = pil_bytes(Image.new("RGBA", (4, 5), (1, 2, 3, 4)), "WEBP")
    refused(with_payload(base, rgba, height=5, width=4), "VP8X")
    frames = [Image.new("RGB", (4, 5), (i, 0, 0)) for i in (0, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:])
    refused(with_payload(base, buf.getvalue(), height=5, width=4), "VP8X")
    lossless = pil_bytes(Image.new("RGB", (4, 5), (9, 8, 7)), "WEBP", lossless=True)
    assert (decode_record(with_payload(base, lossless, height=5, width=4)).image == (9, 8, 7)).all()
    # a real, very compressible WebP as synthaug writes it is fine (~1,600× expansion)
    flat = codec.encode_image(np.zeros((1024, 1024, 3), np.uint8), Encoding.webp)
    assert 1024 * 1024 * 3 / len(flat) > 1000
    assert (decode_record(with_payload(base, flat, height=1024, width=1024)).image == 0).all()


def test_payloads_of_another_format_or_pixel_format_are_refused():
    """An image PIL could read but the header does not describe: another file format (the old
    decoder let PIL guess the format, so a BMP passed as PNG decoded), a palette, 16-bit, RGBA or
    animated PNG."""
    gray = Image.fromarray(make_image(4, 5, 1, 0, "noise")[:, :, 0])  # 4×5, as small_record
    png = small_record(Encoding.png)
    for fmt in ("BMP", "GIF", "TIFF", "JPEG", "WEBP", "PPM"):
        refused(with_payload(png, pil_bytes(gray, fmt)), "not a PNG")
    jpeg = small_record(Encoding.jpeg)
    for fmt in ("BMP", "PNG", "WEBP"):
        refused(with_payload(jpeg, pil_bytes(gray, fmt)), "not a JPEG")
    webp = small_record(Encoding.webp)
    for fmt in ("BMP", "PNG", "JPEG"):
        refused(with_payload(webp, pil_bytes(gray, fmt)), "not a WebP")
    for im in (gray.convert("P"), gray.convert("I;16"), gray.convert("RGBA"), gray.convert("LA"), gray.convert("1")):
        refused(with_payload(png, pil_bytes(im, "PNG")), "color type")
    apng = io.BytesIO()
    gray.save(apng, format="PNG", save_all=True, append_images=[gray.point(lambda v: 255 - v)])
    with pil_spy():
        with pytest.raises(CorruptRecordError, match="frames"):
            decode_record(with_payload(png, apng.getvalue()))


def test_header_fields_no_writer_produces_are_refused():
    value = small_record(Encoding.raw)
    for fields, match in [
        ({"version": 0}, "unknown record format version 0"),
        ({"version": 2}, "newer than this synthaug"),
        ({"encoding": 4}, "unknown encoding code 4"),
        ({"channels": 2}, "2 channels"),
        ({"flags": 4}, "unknown flag bits 0x04"),
        ({"flags": 3}, "both multi-label and soft"),
        ({"flags": 2}, r"value holds (\d+) bytes, header says (\d+)"),  # a soft label takes 12 bytes, not 4
        ({"height": 0, "width": 0, "image_len": 0}, "0×0 image"),
        ({"n_labels": 0, "meta_len": header_of(value)["meta_len"] + 4}, "single-label record holds 0 labels"),
    ]:
        err = refused(rewrite(value, **fields), match)
        with pytest.raises(CorruptRecordError, match=match):
            read_header(rewrite(value, **fields), 4)
        with pytest.raises(CorruptRecordError, match=match):
            peek_label(rewrite(value, **fields), 4)
        assert err.seq == 11
    multi = codec.encode_record(make_image(2, 2, 1, 0, "noise"), [], b"{}", Encoding.raw)
    assert decode_record(multi).label == () and peek_label(multi) == ()


@pytest.mark.parametrize(
    "meta, match",
    [
        (b"\xff\xfe\x00", "not UTF-8"),
        ('{"a":1}'.encode("utf-16"), "not UTF-8"),
        (b'{"a":', "not UTF-8 JSON"),
        (b"[1, 2]", "JSON list, not an object"),
        (b"7", "JSON int"),
        (b"[" * 100_000 + b"]" * 100_000, "not UTF-8 JSON"),
    ],
)
def test_bad_metadata_raises_corrupt_record_error(meta, match):
    value = codec.encode_record(make_image(3, 3, 1, 0, "noise"), 2, meta, Encoding.raw)
    rec = decode_record(value, 9)  # the hot path does not parse the metadata
    assert rec.label == 2
    with pytest.raises(CorruptRecordError, match=match) as err:
        rec.meta
    assert err.value.seq == 9
    with pytest.raises(CorruptRecordError, match=match):
        list(rec)
    for check in (True, False):
        with pytest.raises(CorruptRecordError, match=match):
            peek_meta(value, 9, check_crc=check)


def test_peek_meta_checks_the_crc():
    value = codec.encode_record(make_image(3, 3, 1, 0, "noise"), 2, b'{"seed":12}', Encoding.raw)
    start = HEADER_SIZE + 4 + len(b'{"seed":1')
    damaged = value[:start] + b"3" + value[start + 1 :]
    with pytest.raises(CorruptRecordError, match="CRC-32C mismatch"):
        peek_meta(damaged, 1)
    assert peek_meta(damaged, 1, check_crc=False) == {"seed": 13}
    assert peek_meta(value) == {"seed": 12}


def test_decode_image_raises_only_corrupt_record_error():
    with pytest.raises(CorruptRecordError, match="raw image holds 3 bytes"):
        decode_image(b"abc", Encoding.raw, 2, 2, 1)
    with pytest.raises(CorruptRecordError, match="not a PNG"):
        decode_image(b"\x89PNG" + bytes(40), Encoding.png, 2, 2, 1, seq=4)
    png = payload_of(small_record(Encoding.png))
    np.testing.assert_array_equal(decode_image(memoryview(png), Encoding.png, 4, 5, 1), make_image(4, 5, 1, 0, "gradient"))


# ------------------------------------------------------------------------------- image batches
def test_ambiguous_image_batches_are_refused():
    import torch

    rgb = make_image(28, 28, 3, 0, "noise")
    with pytest.raises(ValueError, match=r"looks like one H×W×C image.*images\[None\]"):
        codec.as_image_batch(rgb)
    with pytest.raises(ValueError, match=r"images\[None\]"):
        codec.as_image_batch(rgb[:, :, :1])
    assert [im.shape for im in codec.as_image_batch(rgb[None])] == [(28, 28, 3)]
    five = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)  # a gray batch
    batch = codec.as_image_batch(five)
    assert len(batch) == 5 and batch[0].shape == (28, 28, 1)
    chw = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
    with pytest.raises(ValueError, match=r"one RGB C×H×W image or three gray H×W images.*N×C×H×W"):
        codec.as_image_batch(chw)
    np.testing.assert_array_equal(codec.as_image_batch(chw[None])[0], rgb)
    assert len(codec.as_image_batch(chw[:, None])) == 3
    one = codec.as_image_batch(chw[:1])  # 1×H×W: one gray image either way
    assert len(one) == 1 and one[0].shape == (28, 28, 1)
    with pytest.raises(ValueError, match=r"looks like one H×W×C image.*N×C×H×W"):
        codec.as_image_batch(torch.from_numpy(rgb))
    assert len(codec.as_image_batch(torch.from_numpy(five.copy()))) == 5
    assert len(codec.as_image_batch([rgb, rgb])) == 2  # a list of H×W×C images is unambiguous
    with pytest.raises(ValueError, match=r"images\[None\]"):
        codec.as_image_batch(rgb[:, :, 0])


def test_append_of_one_hwc_image_is_refused_and_writes_nothing(tmp_path):
    path = tmp_path / "c"
    cache = SyntheticCache(path)
    rgb = make_image(28, 28, 3, 0, "noise")
    with pytest.raises(ValueError, match=r"images\[None\]"):
        cache.append(rgb, 1)
    assert len(cache) == 0
    cache.close()
    assert SyntheticCache(path).stats()["image_spec"] is None
    with SyntheticCache(path) as cache:
        assert cache.append(rgb[None], 1) == [0]
        assert cache.stats()["image_spec"] == {"height": 28, "width": 28, "channels": 3}
        np.testing.assert_array_equal(cache.get(0).image, rgb)
