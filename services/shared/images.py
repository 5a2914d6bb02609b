"""Decoding untrusted image bytes, and encoding images deterministically.

Every image that arrives from a caller or from the store goes through
`decode_image` or `decode_label_map`. Size limits are checked on the byte
length first and on the header's width and height before any pixel is
decoded, so a decompression bomb (a tiny file declaring 20000×20000 pixels)
is refused without allocating it. Failures raise `InvalidInput` with a message
that says what was wrong.

`check_rgb` and `check_cutout` say what is wrong with decoded pixels handed to a
service core (an RGB scene, a foreground and its object mask).

`encode_png` and `encode_npz` write the same bytes for the same pixels every time, so a
redelivered message rewrites identical objects in the store.
"""

from __future__ import annotations

import io
import struct
import warnings
import zipfile
import zlib

import numpy as np
from PIL import Image, UnidentifiedImageError

from freemask.shared.config import LimitsConfig
from freemask.shared.errors import InvalidInput

ACCEPTED_FORMATS = ("PNG", "JPEG")
# What decoding damaged bytes may raise. Pillow reports them as OSError, ValueError or SyntaxError;
# inside its PNG and JPEG parsers EOFError, struct.error, IndexError and zlib.error signal cut-off
# or malformed chunks, and should one escape it is still the bytes' fault, not the service's.
_DECODER_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error, zlib.error)
# Soft maps: float maps in [0, 1] saved by `encode_npz(softmap=...)`.
SOFTMAP_ARRAY = "softmap"
_NPY_FLOATS = (np.dtype("<f2"), np.dtype("<f4"), np.dtype("<f8"))


def _open_checked(data: bytes, limits: LimitsConfig, what: str) -> Image.Image:
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise InvalidInput(f"{what} is empty")
    if len(data) > limits.max_image_bytes:
        raise InvalidInput(f"{what} is {len(data)} bytes; the limit is {limits.max_image_bytes}")
    try:
        with warnings.catch_warnings():
            # PIL warns (or raises) on huge images only after its own global
            # threshold; our per-call limit below is the one that applies.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Only the accepted formats' parsers ever see untrusted bytes.
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError:
        raise InvalidInput(
            f"{what} declares far more pixels than allowed; each side must be in [1, {limits.max_image_side_px}]"
        ) from None
    except (UnidentifiedImageError, *_DECODER_ERRORS):
        raise InvalidInput(f"{what} is not a PNG or JPEG image") from None
    if image.format not in ACCEPTED_FORMATS:
        raise InvalidInput(f"{what} is {image.format}; accepted formats are {', '.join(ACCEPTED_FORMATS)}")
    width, height = image.size
    side = limits.max_image_side_px
    if width > side or height > side or width < 1 or height < 1:
        raise InvalidInput(f"{what} is {width}×{height} px; each side must be in [1, {side}]")
    return image


def _load(image: Image.Image, mode: str, what: str) -> np.ndarray:
    try:
        image.load()
        return np.asarray(image.convert(mode))
    except _DECODER_ERRORS:  # truncated or corrupt pixel data
        raise InvalidInput(f"{what} is truncated or corrupt") from None


def decode_image(data: bytes, limits: LimitsConfig, what: str = "image") -> np.ndarray:
    """RGB pixels, uint8 H×W×3."""
    return _load(_open_checked(data, limits, what), "RGB", what)


def decode_mask(data: bytes, limits: LimitsConfig, what: str = "mask") -> np.ndarray:
    """A single-channel map (label map or binary mask), uint8 H×W; PNG only, since JPEG would blur labels."""
    image = _open_checked(data, limits, what)
    if image.format != "PNG":
        raise InvalidInput(f"{what} must be a PNG (lossless); got {image.format}")
    if image.mode not in ("L", "P", "1"):
        raise InvalidInput(f"{what} has mode {image.mode}; a label map is single-channel (L or P)")
    if image.mode == "P":
        _load(image, "P", what)
        return np.asarray(image)  # palette indices are the labels; convert("L") would map colours
    return _load(image, "L", what)


def encode_png(pixels: np.ndarray) -> bytes:
    """Deterministic PNG bytes for uint8 H×W (labels) or H×W×3 (RGB) pixels."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise InvalidInput(f"cannot encode pixels of dtype {pixels.dtype} and shape {pixels.shape} as PNG")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def decode_instance_map(data: bytes, limits: LimitsConfig, what: str = "instance map") -> np.ndarray:
    """A single-channel instance-id map, uint16 H×W; 16-bit PNG, or 8-bit where ids stay below 256."""
    image = _open_checked(data, limits, what)
    if image.format != "PNG":
        raise InvalidInput(f"{what} must be a PNG (lossless); got {image.format}")
    if image.mode == "L":
        return _load(image, "L", what).astype(np.uint16)
    if image.mode not in ("I;16", "I;16B", "I"):
        raise InvalidInput(f"{what} has mode {image.mode}; an instance map is single-channel 16-bit (I;16) or 8-bit (L)")
    try:
        image.load()
        pixels = np.asarray(image)
    except _DECODER_ERRORS:
        raise InvalidInput(f"{what} is truncated or corrupt") from None
    if pixels.min() < 0 or pixels.max() > 65535:  # mode "I" holds 32-bit values
        raise InvalidInput(f"{what} holds ids outside 0..65535")
    return pixels.astype(np.uint16)


def encode_png16(pixels: np.ndarray) -> bytes:
    """Deterministic 16-bit grayscale PNG bytes for uint16 H×W pixels (instance-id maps)."""
    if pixels.dtype != np.uint16 or pixels.ndim != 2:
        raise InvalidInput(f"cannot encode pixels of dtype {pixels.dtype} and shape {pixels.shape} as a 16-bit PNG")
    buffer = io.BytesIO()
    # Pillow stores a native uint16 array as mode I;16, which PNG writes as 16-bit grayscale.
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def encode_npz(**arrays: np.ndarray) -> bytes:
    """Deterministic compressed .npz bytes (what `np.load` reads).

    Members are written in name order with a fixed timestamp, so the bytes depend
    on the arrays alone, whatever numpy's own `savez` does with zip metadata.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in sorted(arrays.items()):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def decode_soft_map(data: bytes, limits: LimitsConfig, what: str = "soft map") -> np.ndarray:
    """A soft attention map from `.npz` bytes (array `softmap`, float H×W) as float32.

    The archive is untrusted like an image: its byte length is checked first, then the array's
    header (shape and dtype) before any element is inflated, so a small archive declaring a huge
    array is refused without allocating it. Pickled objects are never loaded, and NaN or infinite
    values are refused: they would silently turn into masks and heat maps.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise InvalidInput(f"{what} is empty")
    if len(data) > limits.max_image_bytes:
        raise InvalidInput(f"{what} is {len(data)} bytes; the limit is {limits.max_image_bytes}")
    member = f"{SOFTMAP_ARRAY}.npy"
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            if member not in archive.namelist():
                raise InvalidInput(f"{what} holds no array {SOFTMAP_ARRAY!r}")
            with archive.open(member) as stream:
                version = np.lib.format.read_magic(stream)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
                else:
                    raise InvalidInput(f"{what} uses .npy format {version}; expected 1.0 or 2.0")
                if dtype not in _NPY_FLOATS:
                    raise InvalidInput(f"{what} has dtype {dtype}; a soft map is little-endian float")
                side = limits.max_image_side_px
                if len(shape) != 2 or not all(1 <= n <= side for n in shape):
                    raise InvalidInput(f"{what} has shape {shape}; a soft map is H×W with each side in [1, {side}]")
                count = int(shape[0]) * int(shape[1])
                raw = stream.read(count * dtype.itemsize + 1)
    except InvalidInput:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, *_DECODER_ERRORS):
        raise InvalidInput(f"{what} is not a readable .npz archive") from None
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(f"{what} holds {len(raw)} bytes of data; its header declares {count * dtype.itemsize}")
    values = np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C").astype(np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        raise InvalidInput(f"{what} holds {int((~finite).sum())} NaN or infinite values")
    return values


def size_text(array: np.ndarray) -> str:
    """An array's picture size as "WxH", for error messages."""
    return "x".join(str(n) for n in array.shape[1::-1]) if array.ndim >= 2 else str(array.shape)


def check_rgb(image: np.ndarray, what: str, dims: str = "(H, W, 3)") -> None:
    """InvalidInput unless `image` is a non-empty uint8 RGB array."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise InvalidInput(f"{what} must be a non-empty {dims} uint8 image, got {image.shape} {image.dtype}")


def check_cutout(foreground: np.ndarray, mask: np.ndarray) -> None:
    """InvalidInput unless `foreground` is an RGB image and `mask` a non-empty boolean mask of its size:
    the object to place or paste."""
    check_rgb(foreground, "foreground", "(h, w, 3)")
    if mask.dtype != np.bool_ or mask.shape != foreground.shape[:2]:
        raise InvalidInput(f"foreground mask is {size_text(mask)} {mask.dtype}; it must be a boolean mask the size "
                           f"of the foreground ({size_text(foreground)})")
    if not mask.any():
        raise InvalidInput("foreground mask is empty: no pixel is marked as the object")


def voc_colour_map() -> np.ndarray:
    """Pascal VOC's label colours, 256×3 uint8: the bits of an id interleaved into R, G and B
    from the top bit down (0 is black; 255, the ignore id, is (224, 224, 192))."""
    colours = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        for bit in range(8):
            for channel in range(3):
                colours[index, channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
    return colours
