"""One image file: how big it is (from its header), its pixels as 8-bit arrays, and the one limit
on how many pixels an image may have, the same whether a folder is decoded into memory or
streamed from disk.

Nothing here imports PyTorch: the functions read files with Pillow and numpy only.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import contextmanager

import attrs
import numpy as np

from neurosim.common.errors import DataError

__all__ = ["JPEG_MAGIC", "TooLarge", "UnsupportedMode", "failure_reason", "header_size", "image_size",
           "max_image_pixels", "open_image", "pixels", "too_large_error"]

# The first bytes of every JPEG file.
JPEG_MAGIC = b"\xff\xd8\xff"

# --- pixels --------------------------------------------------------------------------------------

# Greyscale modes of 16-bit samples (0..65535): 16-bit PNGs and TIFFs open as one of these.
_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")
# Formats whose 32-bit integer mode "I" only ever holds 16-bit samples: older Pillows open 16-bit
# greyscale PNGs as "I", and PGMs of more than 8 bits open as "I" scaled to 0..65535.
_FORMATS_16BIT_I = ("PNG", "PPM")
# 8-bit modes that Pillow converts to RGB by a fixed rule (CMYK, YCbCr, HSV and LAB by their colour
# transforms, alpha dropped, palettes looked up). Pillow itself reduces 48- and 64-bit RGB(A)
# PNGs to "RGB"/"RGBA" by keeping each sample's high byte.
_MODES_TO_RGB = frozenset({"1", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "HSV", "LAB"})
_MODE_NAMES = {"F": "32-bit floating-point pixels", "I": "32-bit integer pixels",
               "La": "greyscale with premultiplied alpha", "I;16S": "signed 16-bit pixels"}


class UnsupportedMode(Exception):
    """An image whose pixel mode has no faithful 8-bit form."""


def pixels(im) -> np.ndarray:
    """One opened image as H×W (greyscale) or H×W×3 (RGB) uint8 pixels, without clipping.

    8-bit greyscale stays as it is; 16-bit greyscale is scaled to 8 bits (round(v / 257), so
    0..65535 maps onto 0..255) and stays one channel; the modes in `_MODES_TO_RGB` become RGB.
    Anything else (float, 32-bit integer, ...) has no known value range: `UnsupportedMode`.
    """
    mode = im.mode
    if mode == "L":
        return np.asarray(im)
    if mode in _MODES_16BIT or (mode == "I" and im.format in _FORMATS_16BIT_I):
        a = np.asarray(im)
        if a.ndim != 2 or (a.size and (int(a.min()) < 0 or int(a.max()) > 65535)):
            raise UnsupportedMode(f"mode {mode!r} with values outside 0..65535")
        # round(v / 257) exactly: v / 257 is never halfway between two integers.
        return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if mode in _MODES_TO_RGB:
        return np.asarray(im.convert("RGB"))
    what = _MODE_NAMES.get(mode, "pixels with no faithful 8-bit form")
    raise UnsupportedMode(
        f"mode {mode!r}, {what}, which cannot be reduced to 8 bits without guessing its range; "
        "save it as 8- or 16-bit greyscale or RGB"
    )


def failure_reason(exc: Exception, path: str) -> str:
    """Why an image could not be read, in a few words and without its path."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    else:
        text = str(exc).replace(repr(path), "").replace(path, "")
    text = " ".join(text.split()).rstrip(" :")
    return text or type(exc).__name__


# --- how big one image may be --------------------------------------------------------------------

def max_image_pixels() -> int | None:
    """The most pixels (width × height) one image of a folder may have, whether the folder is
    decoded up front or streamed: Pillow's decompression-bomb limit, above which Pillow refuses
    to open an image: 2 × ``PIL.Image.MAX_IMAGE_PIXELS``, 178,956,970 by default (13,377 pixels
    square). None where a program switched it off (``PIL.Image.MAX_IMAGE_PIXELS = None``).

    An image that big is almost always a mistake (a scan, a panorama, a crafted file that
    decompresses to gigabytes): decoded it takes over 500 MB, and every epoch would decode it
    again to crop a few hundred pixels. torchvision's decoders, which decode a streamed folder's
    JPEGs and PNGs, have no limit of their own: the limit is applied to the header first."""
    from PIL import Image

    return None if Image.MAX_IMAGE_PIXELS is None else 2 * int(Image.MAX_IMAGE_PIXELS)


@attrs.frozen
class TooLarge:
    """An image over `max_image_pixels` (``limit``), in place of its pixels."""

    path: str
    width: int
    height: int
    limit: int


def too_large_error(found: Sequence[TooLarge]) -> DataError:
    """The one message for images over the limit, the same for a folder decoded up front and
    one streamed: the first image, its size, the limit and where it comes from, and the others."""
    first = found[0]
    others = ""
    if len(found) > 1:
        named = ", ".join(f"{t.path} ({t.width}x{t.height})" for t in found[1:3])
        others = f"; so are {named}" + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    them = "them" if len(found) > 1 else "it"
    return DataError(
        f"image {first.path} is {first.width}x{first.height} pixels ({first.width * first.height:,}), more than "
        f"the {first.limit:,} an image may have (Pillow's decompression-bomb limit, 2 x PIL.Image.MAX_IMAGE_PIXELS)"
        f"{others}; shrink or remove {them}"
    )


_PILLOW_LIMIT = threading.Lock()


@contextmanager
def open_image(source):
    """``PIL.Image.open(source)`` with Pillow's own decompression-bomb check off: the callers
    compare the size with `max_image_pixels` themselves, so that an image over it is refused with
    one message, and one between half of it and it decodes without Pillow's warning, however the
    folder is read (torchvision's decoders give neither)."""
    from PIL import Image

    with _PILLOW_LIMIT:  # the switch is Pillow's global setting
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            im = Image.open(source)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    with im:
        yield im


# --- sizes from headers --------------------------------------------------------------------------

# JPEG frame headers (SOF0..SOF15, less DHT, JPG and DAC, which share the range): they hold the size.
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def header_size(read) -> tuple[int, int] | None:
    """(width, height) of a JPEG, PNG or GIF from its header, ``read(offset, n)`` giving its
    bytes; None for other formats, or a header it cannot follow (the decoder then decides).

    A JPEG's size is in its frame header, after any metadata segments (EXIF, ICC profiles):
    the walk reads four bytes per segment, not the segments."""
    head = read(0, 26)
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
    if not head.startswith(JPEG_MAGIC):
        return None
    pos = 2
    while True:
        m = read(pos, 2)
        if len(m) < 2 or m[0] != 0xFF:
            return None
        if m[1] == 0xFF:  # a fill byte
            pos += 1
            continue
        marker, pos = m[1], pos + 2
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a segment
            continue
        if marker in (0xD9, 0xDA):  # the end, or the scan, before any frame header
            return None
        seg = read(pos, 7)  # length, then (in a frame header) precision, height, width
        if len(seg) < 2:
            return None
        if marker in _JPEG_FRAMES:
            if len(seg) < 7:
                return None
            return int.from_bytes(seg[5:7], "big"), int.from_bytes(seg[3:5], "big")
        length = int.from_bytes(seg[:2], "big")
        if length < 2:
            return None
        pos += length


def image_size(path: str) -> tuple[int, int] | None:
    """(width, height) of an image file from its header (Pillow's for formats `header_size` does
    not read); None if it cannot be read (the loader then names it)."""
    try:
        with open(path, "rb") as f:
            def read(offset: int, n: int) -> bytes:
                f.seek(offset)
                return f.read(n)

            size = header_size(read)
            if size is not None:
                return size
        with open_image(path) as im:
            return im.size
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - OSError, PIL's errors: the loader reports unreadable images
        return None
