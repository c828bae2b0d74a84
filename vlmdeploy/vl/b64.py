"""Strict base64 decoding that lets other threads run.

Images sent as ``data:`` URLs are decoded on the preparation threads while the engine thread
launches GPU work. CPython's decoder holds the GIL for the whole payload, milliseconds for a large
image, and every launch of the engine thread that falls in that time waits for it. numpy's array
operations let the GIL go, so a decoder built from them leaves the engine thread free, and it is
no slower than CPython's besides. It accepts what Python 3.13's ``base64.b64decode(text,
validate=True)`` accepts (the standard alphabet, "=" only to complete the last group of four, no
other characters) and returns the same bytes. Python 3.11 and 3.12 also accept "=" after a
complete last group ("QUJD=="), which is not base64; this decoder does not.
"""

from __future__ import annotations

import binascii

import numpy as np

_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_PAD = ord("=")
_VALUES = np.full(256, 64, np.uint8)  # 64: not in the alphabet
_VALUES[np.frombuffer(_ALPHABET, np.uint8)] = np.arange(64, dtype=np.uint8)


def b64decode_strict(text: str | bytes) -> bytes:
    """Strict base64 decoding with the GIL released for most of the work. Raises
    ``binascii.Error`` on invalid base64 and ``ValueError`` on a str that is not ASCII."""
    data = text.encode("ascii") if isinstance(text, str) else bytes(text)
    return decode_array(np.frombuffer(data, np.uint8))


def decode_array(chars: np.ndarray) -> bytes:
    """Decode base64 characters (uint8, 1-D) under the strict rules above."""
    n = chars.size
    if n == 0:
        return b""
    if n % 4:
        raise binascii.Error("Incorrect padding")
    pad = 0
    if chars[-1] == _PAD:
        pad = 2 if chars[-2] == _PAD else 1
    values = _VALUES[chars]  # a new array: the padding is zeroed below
    if pad:
        values[n - pad :] = 0
    if values.max() > 63:  # outside the alphabet, or "=" anywhere but the last one or two places
        raise binascii.Error("Only base64 data is allowed")
    quads = values.reshape(-1, 4)
    a, b, c, d = quads[:, 0], quads[:, 1], quads[:, 2], quads[:, 3]
    out = np.empty((quads.shape[0], 3), np.uint8)  # 6-bit values: no shift below overflows
    np.bitwise_or(np.left_shift(a, 2), np.right_shift(b, 4), out=out[:, 0])
    np.bitwise_or(np.left_shift(b & 15, 4), np.right_shift(c, 2), out=out[:, 1])
    np.bitwise_or(np.left_shift(c & 3, 6), d, out=out[:, 2])
    return out.reshape(-1)[: out.size - pad].tobytes()
