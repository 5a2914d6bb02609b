"""Untrusted image bytes: refused with a clear reason, or decoded exactly."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from freemask.shared.config import LimitsConfig
from freemask.shared.errors import InvalidInput
from freemask.shared.images import decode_image, decode_mask, encode_npz, encode_png

LIMITS = LimitsConfig(max_image_bytes=64 * 1024, max_image_side_px=512)


def png_bytes(pixels: np.ndarray) -> bytes:
    return encode_png(pixels)


def with_declared_size(png: bytes, width: int, height: int) -> bytes:
    """The same PNG with its IHDR claiming another size (a decompression-bomb header)."""
    ihdr_start = 8 + 8  # signature, then the IHDR chunk's length and type
    body = struct.pack(">II", width, height) + png[ihdr_start + 8 : ihdr_start + 13]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + body) & 0xFFFFFFFF)
    return png[:ihdr_start] + body + crc + png[ihdr_start + 17 :]


def test_rgb_round_trip_is_exact_and_encoding_is_deterministic() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    data = png_bytes(pixels)
    assert png_bytes(pixels) == data, "the same pixels must give the same bytes"
    assert np.array_equal(decode_image(data, LIMITS), pixels)


def test_label_maps_keep_their_values_including_palette_indices() -> None:
    labels = np.array([[0, 1, 255], [12, 3, 0]], dtype=np.uint8)
    assert np.array_equal(decode_mask(png_bytes(labels), LIMITS), labels)
    palette = Image.fromarray(labels, mode="L").convert("P")
    palette.putpalette([v for i in range(256) for v in (i * 7 % 256, i, 255 - i)])
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    assert np.array_equal(decode_mask(buffer.getvalue(), LIMITS), np.asarray(palette))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "is empty"),
        (b"GIF89a not really", "not a PNG or JPEG image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a PNG or JPEG image"),
        (b"x" * (64 * 1024 + 1), "bytes; the limit is 65536"),
    ],
)
def test_bytes_that_are_not_an_acceptable_image(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason):
        decode_image(data, LIMITS)


@pytest.mark.parametrize(("width", "height"), [(20000, 20000), (600, 8), (8, 4000)])
def test_a_header_declaring_too_many_pixels_is_refused_before_decoding(width: int, height: int) -> None:
    bomb = with_declared_size(png_bytes(np.zeros((8, 8, 3), np.uint8)), width, height)
    with pytest.raises(InvalidInput, match=r"each side must be in \[1, 512\]"):
        decode_image(bomb, LIMITS)


def test_truncated_pixel_data_is_refused() -> None:
    data = png_bytes(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(InvalidInput, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2], LIMITS)


def test_masks_must_be_lossless_and_single_channel() -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buffer, format="JPEG")
    with pytest.raises(InvalidInput, match="must be a PNG"):
        decode_mask(buffer.getvalue(), LIMITS)
    with pytest.raises(InvalidInput, match="mode RGB"):
        decode_mask(png_bytes(np.zeros((8, 8, 3), np.uint8)), LIMITS)


def test_encode_refuses_what_is_not_uint8_pixels() -> None:
    with pytest.raises(InvalidInput, match="cannot encode"):
        encode_png(np.zeros((4, 4), np.float32))


def test_npz_bytes_are_reproducible_and_load_with_numpy() -> None:
    soft = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    first = encode_npz(softmap=soft)
    time.sleep(2.1)  # zip stamps have 2 s resolution: a time-based stamp would now differ
    assert encode_npz(softmap=soft) == first
    loaded = np.load(io.BytesIO(first), allow_pickle=False)
    assert loaded.files == ["softmap"] and np.array_equal(loaded["softmap"], soft)
    assert loaded["softmap"].dtype == np.float32


# --- 16-bit instance maps -----------------------------------------------------------------------------------------

from freemask.shared.images import decode_instance_map, encode_png16  # noqa: E402


def test_instance_maps_round_trip_16_bit_ids_and_encode_deterministically() -> None:
    ids = np.random.default_rng(1).integers(0, 65536, (20, 30), dtype=np.uint16)
    ids[0, :3] = (0, 255, 65535)
    data = encode_png16(ids)
    assert encode_png16(ids.copy()) == data
    decoded = decode_instance_map(data, LIMITS)
    assert decoded.dtype == np.uint16 and np.array_equal(decoded, ids)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")


def test_an_8_bit_instance_map_is_read_as_16_bit() -> None:
    ids = np.arange(12, dtype=np.uint8).reshape(3, 4)
    decoded = decode_instance_map(encode_png(ids), LIMITS)
    assert decoded.dtype == np.uint16 and np.array_equal(decoded, ids)


def test_instance_maps_must_be_single_channel_pngs() -> None:
    rgb = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(InvalidInput, match="instance map has mode RGB; an instance map is single-channel 16-bit"):
        decode_instance_map(encode_png(rgb), LIMITS)
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buffer, format="JPEG")
    with pytest.raises(InvalidInput, match="must be a PNG"):
        decode_instance_map(buffer.getvalue(), LIMITS)
    with pytest.raises(InvalidInput, match="is not a PNG or JPEG image"):
        decode_instance_map(b"not an image", LIMITS)
    with pytest.raises(InvalidInput, match="is truncated or corrupt"):
        decode_instance_map(encode_png16(np.ones((64, 64), np.uint16) * 999)[:80], LIMITS)


@pytest.mark.parametrize("pixels", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 1), np.uint16),
                                    np.zeros((4, 4), np.int32)])
def test_encode_png16_refuses_what_is_not_a_uint16_map(pixels: np.ndarray) -> None:
    with pytest.raises(InvalidInput, match="as a 16-bit PNG"):
        encode_png16(pixels)
