"""The base64 decoder of data: URLs accepts and rejects exactly what the standard library's strict
decoder does (as of Python 3.13), and returns the same bytes."""

import base64
import binascii
import random

import numpy as np
import pytest

from vlmdeploy.vl.b64 import b64decode_strict


def stdlib(text: bytes):
    """The standard library's strict decoding, less its acceptance of "=" after a complete last
    group of four in Python 3.11 and 3.12 (3.13 rejects it)."""
    if text.endswith(b"=") and len(text.rstrip(b"=")) % 4 == 0:
        return "error"
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return "error"


def ours(text: bytes):
    try:
        return b64decode_strict(text)
    except (binascii.Error, ValueError):
        return "error"


EDGE_CASES = [
    b"", b"QQ==", b"QR==", b"QUI=", b"QUJD", b"QUJDRA==", b"QQ=", b"QQ", b"QQ===", b"=QQ=",
    b"QQ==QQ==", b"Q===", b"====", b"==", b"QQ=A", b"QUJD\n", b"Q Q==", b"QUJD====", b"QU=D",
    b"QUJ-", b"QUJ_", b"QUJ\x00", b"QUJ\xff", b"A", b"AB", b"ABC", b"ABCDE",
]


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases_match_the_standard_library(text):
    assert ours(text) == stdlib(text)


def test_random_payloads_and_corruptions_match_the_standard_library():
    rng = random.Random(0)
    bad = b"=-_ \n\t.\x00\x80\xff!"
    for _ in range(3000):
        data = rng.randbytes(rng.randrange(0, 64))
        text = bytearray(base64.b64encode(data))
        assert ours(bytes(text)) == data  # every valid encoding, every padding length
        kind = rng.randrange(4)
        if kind == 0 and text:  # one character replaced
            text[rng.randrange(len(text))] = rng.choice(bad + b"AZaz09+/")
        elif kind == 1:  # one character inserted
            text.insert(rng.randrange(len(text) + 1), rng.choice(bad))
        elif kind == 2 and text:  # cut short
            del text[rng.randrange(len(text)) :]
        else:  # padding added
            text += b"=" * rng.randrange(1, 4)
        assert ours(bytes(text)) == stdlib(bytes(text)), bytes(text)


def test_text_payloads_large_and_small():
    data = np.random.default_rng(1).integers(0, 256, 1 << 18, np.uint8).tobytes()
    text = base64.b64encode(data).decode()
    assert b64decode_strict(text) == data and b64decode_strict(text.encode()) == data
    assert b64decode_strict("c21hbGw=") == b"small" and b64decode_strict("") == b""
    with pytest.raises(binascii.Error):
        b64decode_strict(text[:100] + "!" + text[101:])
    with pytest.raises(binascii.Error):  # accepted by Python 3.11 and 3.12, not base64
        b64decode_strict("QUJD==")
    with pytest.raises(ValueError):  # a str that is not ASCII
        b64decode_strict(text[:100] + "é" + text[101:])
