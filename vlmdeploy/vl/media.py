"""Image input: load and decode untrusted images under explicit limits.

``load_image(source, policy)`` accepts a PIL image, raw bytes, a local path, a ``file://`` URL,
a ``data:image/...;base64,...`` URL or an http(s) URL, and returns an RGB ``PIL.Image.Image``.
Every failure raises ``vlmdeploy.errors.ImageError`` with a stable ``code`` and a fixed message
that never contains the input, a path, an address or a library's text
(:mod:`vlmdeploy.vl.media_policy`).

What a :class:`MediaPolicy` guarantees:

* Sizes are bounded before work is done: encoded bytes (``max_bytes``; for data URLs from the
  string length, before base64 decoding; for HTTP by capping the read, whatever
  ``Content-Length`` says) and pixels (``max_pixels``, from the image header, before decoding).
* The format is detected from magic bytes (not from a declared MIME type) and must be in
  ``allowed_formats``; PIL may only try that one decoder.
* HTTP(S) only to checked hosts and addresses (:mod:`vlmdeploy.vl.ssrf`), over connections
  pinned to the checked address, with redirects re-checked per hop and one deadline for the
  whole fetch (:mod:`vlmdeploy.vl.fetch`).
* Local files only when ``allow_local_files``; with ``local_root`` set they must resolve
  (symlinks and ``..`` included) inside that directory. Only regular files are read.

Mode normalisation matches LMDeploy (``Image.open(...).convert("RGB")``, first frame): alpha is
dropped, not composited (RGBA, LA, PA keep their colour channels); palette images use their
palette colours (a tRNS entry is ignored); CMYK and grayscale use PIL's conversion; animated
GIF/WebP give their first frame; EXIF orientation is NOT applied (LMDeploy does not apply it
either, so the model sees the same pixels under both). One deliberate difference: 16-bit
grayscale (``I;16*``) is scaled to 8 bits (``v >> 8``), the way PIL already reads 16-bit RGB
PNGs, where PIL's ``convert("RGB")`` would clip every value above 255 to white.

All functions are pure (no module state is written) and safe to call from a thread pool.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import stat
import threading
from urllib.parse import unquote, urlsplit

import numpy as np
from PIL import Image

from vlmdeploy.errors import ImageError
from vlmdeploy.vl.b64 import b64decode_strict
from vlmdeploy.vl.fetch import fetch_http
from vlmdeploy.vl.media_policy import (
    MSG_FORMAT,
    MSG_LOCAL_DENIED,
    MSG_LOCAL_READ,
    MSG_TOO_LARGE,
    MSG_TYPE,
    MSG_URL,
    MediaPolicy,
    fail,
)

__all__ = ["MediaPolicy", "encode_image_base64", "load_image", "sniff_format"]


# -------------------------------------------------------------------------------------- public API


def load_image(
    image: str | os.PathLike | bytes | Image.Image,
    policy: MediaPolicy | None = None,
    cancel: threading.Event | None = None,
) -> Image.Image:
    """Load ``image`` (PIL image, bytes, path, ``file://``, ``data:`` or http(s) URL) as RGB.
    Setting ``cancel`` (from another thread) stops an http(s) download within
    ``fetch.CANCEL_POLL_S`` with an ``ImageError`` of code ``cancelled``."""
    policy = policy or MediaPolicy()
    if isinstance(image, Image.Image):
        return _from_pil(image, policy)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _decode(bytes(image), policy)
    if isinstance(image, os.PathLike):
        image = os.fspath(image)
    if not isinstance(image, str):
        raise fail("invalid_image_url", MSG_URL)
    return _decode(_read_source(image, policy, cancel), policy)


def encode_image_base64(
    image: str | os.PathLike | bytes | Image.Image,
    format: str = "PNG",
    policy: MediaPolicy | None = None,
) -> str:
    """Base64 text (no ``data:`` prefix) of the RGB image saved as ``format``, like LMDeploy's."""
    rgb = load_image(image, policy)
    buffer = io.BytesIO()
    rgb.save(buffer, format=format)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------- source routing

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _read_source(text: str, policy: MediaPolicy, cancel: threading.Event | None = None) -> bytes:
    head = text[:8].lower()
    if head.startswith(("http:", "https:")):
        return fetch_http(text, policy, cancel)
    if head.startswith("data:"):
        return _read_data_url(text, policy)
    if head.startswith("file:"):
        return _read_local(_file_url_path(text), policy)
    if _SCHEME.match(text):  # gopher://, ftp://, ...: refused, never treated as a path
        raise fail("invalid_image_url", MSG_URL)
    return _read_local(text, policy)


# --------------------------------------------------------------------------------------- data URLs

# Declared MIME type -> the format it names. The declared type must be an allowed one, but decoding
# follows the magic bytes (a PNG labelled image/jpeg is decoded as PNG).
_MIME_FORMATS = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/pjpeg": "JPEG",
    "image/webp": "WEBP",
    "image/gif": "GIF",
    "image/bmp": "BMP",
    "image/x-bmp": "BMP",
    "image/x-ms-bmp": "BMP",
    "image/tiff": "TIFF",
}


def _read_data_url(text: str, policy: MediaPolicy) -> bytes:
    header, comma, payload = text[5:].partition(",")
    params = header.lower().split(";")
    if not comma or len(params) < 2 or params[-1].strip() != "base64":
        raise fail("invalid_image_url", MSG_URL)
    if _MIME_FORMATS.get(params[0].strip()) not in policy.allowed_formats:
        raise fail("unsupported_image_type", MSG_TYPE)
    # Bound the work before decoding: 4 base64 characters carry 3 bytes.
    if len(payload) > 4 * -(-policy.max_bytes // 3):
        raise fail("image_too_large", MSG_TOO_LARGE)
    try:
        return b64decode_strict(payload)
    except (binascii.Error, ValueError):
        raise fail("invalid_image_format", MSG_FORMAT) from None


# ------------------------------------------------------------------------------------- local files


def _file_url_path(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced '[' in the authority
        raise fail("invalid_image_url", MSG_URL) from None
    if parts.netloc not in ("", "localhost"):  # file://host/... would mean a remote share
        raise fail("invalid_image_url", MSG_URL)
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise fail("invalid_image_url", MSG_URL)
    return path


def _confine(path: str, root: str) -> str:
    """Resolve ``path`` (relative paths are taken from ``root``) and require it inside ``root``."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, path))
    if os.path.commonpath([real_root, real]) != real_root:
        raise fail("invalid_image_url", MSG_LOCAL_DENIED)
    return real


def _read_local(path: str, policy: MediaPolicy) -> bytes:
    if not policy.allow_local_files:
        raise fail("invalid_image_url", MSG_LOCAL_DENIED)
    if not path or "\x00" in path:
        raise fail("invalid_image_url", MSG_LOCAL_READ)
    try:
        path.encode()  # a lone surrogate cannot name a file: refuse it like any unreadable path
    except UnicodeEncodeError:
        raise fail("invalid_image_url", MSG_LOCAL_READ) from None
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if policy.local_root is not None:
        path = _confine(path, policy.local_root)
        flags |= getattr(os, "O_NOFOLLOW", 0)  # the last component must not become a symlink
    try:
        # O_NONBLOCK: opening a FIFO must not hang; non-regular files are refused below.
        fd = os.open(path, flags)
    except OSError:
        raise fail("invalid_image_url", MSG_LOCAL_READ) from None
    try:
        if policy.local_root is not None:
            _recheck_opened(fd, policy.local_root)
        return _read_fd(fd, policy.max_bytes)
    finally:
        os.close(fd)


def _recheck_opened(fd: int, root: str) -> None:
    """Where the OS can name an open file, check the opened file again: a directory swapped for a
    symlink between the check and the open must not let the read escape the root."""
    link = f"/proc/self/fd/{fd}"
    if os.path.islink(link):
        _confine(os.readlink(link), root)


def _read_fd(fd: int, max_bytes: int) -> bytes:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise fail("invalid_image_url", MSG_LOCAL_READ)
    if info.st_size > max_bytes:
        raise fail("image_too_large", MSG_TOO_LARGE)
    chunks, total = [], 0
    while total <= max_bytes:  # the file may grow after fstat
        chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if total > max_bytes:
        raise fail("image_too_large", MSG_TOO_LARGE)
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------- decoding

# (magic prefix, format); WEBP is 'RIFF' + 4 size bytes + 'WEBP', checked separately.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"<?xml", "SVG"),
    (b"<svg", "SVG"),
)


def sniff_format(data: bytes) -> str | None:
    """The image format named by the leading bytes, or None if unrecognised."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp":  # ISO media: HEIC, AVIF, ...
        return "HEIF"
    return next((fmt for magic, fmt in _MAGIC if data.startswith(magic)), None)


def _decode(data: bytes, policy: MediaPolicy) -> Image.Image:
    if len(data) > policy.max_bytes:
        raise fail("image_too_large", MSG_TOO_LARGE)
    fmt = sniff_format(data)
    if fmt is None:
        raise fail("invalid_image_format", MSG_FORMAT)
    if fmt not in policy.allowed_formats:
        raise fail("unsupported_image_type", MSG_TYPE)
    try:
        # Only the sniffed format's decoder may run; open() reads the header, not the pixels.
        image = Image.open(io.BytesIO(data), formats=[fmt])
        _check_pixels(image, policy)
        image.load()
        return _to_rgb(image, fresh=True)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise fail("image_too_large", MSG_TOO_LARGE) from None
    except Exception:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
        raise fail("invalid_image_format", MSG_FORMAT) from None


def _check_pixels(image: Image.Image, policy: MediaPolicy) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise fail("invalid_image_format", MSG_FORMAT)
    if width * height > policy.max_pixels:
        raise fail("image_too_large", MSG_TOO_LARGE)


def _from_pil(image: Image.Image, policy: MediaPolicy) -> Image.Image:
    _check_pixels(image, policy)
    try:
        return _to_rgb(image)
    except Exception:  # a lazily opened image whose data is broken
        raise fail("invalid_image_format", MSG_FORMAT) from None


_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _to_rgb(image: Image.Image, fresh: bool = False) -> Image.Image:
    """A new RGB image (never the caller's object). See the module docstring for the choices.
    ``fresh``: ``image`` was just decoded here and nobody else holds it, so an RGB one is returned
    as it is rather than copied (a full copy of every decoded image is pure overhead)."""
    if fresh and image.mode == "RGB":
        return image
    if image.mode in _MODES_16BIT:
        # Scale, don't clip: the high byte is the 8-bit value (as PIL reads 16-bit RGB PNGs).
        high = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)  # (H, W)
        image = Image.fromarray(high)
    return image.convert("RGB")
