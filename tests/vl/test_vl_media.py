"""load_image without a network: input forms, formats, modes, data URLs, local files, size limits
(RELIABILITY §3.3 rows I1-I8 and I17)."""

from __future__ import annotations

import base64
import dataclasses
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from vlmdeploy.errors import ImageError, InvalidRequestError
from vlmdeploy.vl import (
    MediaPolicy,
    encode_image_base64,
    load_image,
    media_policy,
    num_tiles,
    pixel_values,
)
from vlmdeploy.vl import media as media_module

SERVER = MediaPolicy.server_default()


def fails(code: str, source, policy: MediaPolicy | None = None) -> ImageError:
    with pytest.raises(ImageError) as info:
        load_image(source, policy)
    err = info.value
    assert err.code == code, (err.code, err.message)
    assert isinstance(err, InvalidRequestError) and err.status == 400
    # Fixed text: no library text, no input echoed; the cause is not attached to leak it either.
    assert str(err) == err.message and err.__cause__ is None
    assert err.__context__ is None or err.__suppress_context__
    return err


def data_url(payload: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(payload).decode()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def lmdeploy_rule(data: bytes) -> np.ndarray:
    """What LMDeploy's loader produces: open the bytes, convert to RGB."""
    import io

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ----------------------------------------------------------------------------------- input forms


def test_every_input_form_gives_the_same_rgb(sample, tmp_path):
    image, png = sample
    path = tmp_path / "a.png"
    path.write_bytes(png)
    sources = [
        image, png, bytearray(png), memoryview(png), str(path), path, f"file://{path}",
        f"file://localhost{path}", data_url(png),
    ]  # fmt: skip
    for source in sources:
        out = load_image(source)
        assert out.mode == "RGB" and out.size == (8, 6)
        assert np.array_equal(pixels(out), pixels(image)), type(source)


def test_pil_input_is_copied_not_aliased(sample):
    image, _ = sample
    out = load_image(image)
    assert out is not image
    gray = image.convert("L")
    assert load_image(gray).mode == "RGB" and gray.mode == "L"


def test_relative_path(sample, tmp_path, monkeypatch):
    _, png = sample
    (tmp_path / "rel.png").write_bytes(png)
    monkeypatch.chdir(tmp_path)
    assert load_image("rel.png").size == (8, 6)


def test_unsupported_input_types():
    fails("invalid_image_url", 123)
    fails("invalid_image_url", None)


def test_encode_image_base64(sample, tmp_path):
    image, png = sample
    path = tmp_path / "a.png"
    path.write_bytes(png)
    for source in (image, png, str(path)):
        text = encode_image_base64(source)
        assert not text.startswith("data:")
        decoded = Image.open(__import__("io").BytesIO(base64.b64decode(text, validate=True)))
        assert decoded.format == "PNG" and np.array_equal(pixels(decoded), pixels(image))
    jpeg = base64.b64decode(encode_image_base64(image.convert("RGBA"), format="JPEG"))
    assert jpeg[:3] == b"\xff\xd8\xff"  # saved as RGB: JPEG cannot hold alpha


# ------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_allowed_formats_decode(sample, encode_image, fmt):
    image, _ = sample
    data = encode_image(image, fmt)
    out = load_image(data)
    assert out.mode == "RGB" and out.size == image.size
    assert np.array_equal(pixels(out), lmdeploy_rule(data))


def test_other_formats_are_refused(sample, encode_image):
    image, _ = sample
    fails("unsupported_image_type", encode_image(image, "TIFF"))
    fails("unsupported_image_type", b"%PDF-1.7 ...")
    fails("unsupported_image_type", b'<svg xmlns="http://www.w3.org/2000/svg"/>')
    only_png = MediaPolicy(allowed_formats=("png",))
    assert load_image(encode_image(image, "PNG"), only_png).size == image.size
    fails("unsupported_image_type", encode_image(image, "JPEG"), only_png)


def test_tiff_only_when_allowed(sample, encode_image):
    image, _ = sample
    policy = MediaPolicy(allowed_formats=("PNG", "TIFF"))
    assert np.array_equal(pixels(load_image(encode_image(image, "TIFF"), policy)), pixels(image))


# ----------------------------------------------------------------------------------- data URLs


@pytest.mark.parametrize(
    "payload",
    [
        "iVBORw0KGgo!!!!",  # characters outside the alphabet (I1)
        "iVBORw0KGgo",  # bad padding
        "iVBORw0K Ggo=",  # whitespace
        "iVBORw0K\nGgo=",
        "aGVsbG8=",  # valid base64, not an image
        "",
        "iVBORw0KGgoé",  # non-ASCII
    ],
)
def test_data_url_bad_base64(payload):
    fails("invalid_image_format", f"data:image/png;base64,{payload}")


@pytest.mark.parametrize(
    "mime", ["image/svg+xml", "image/tiff", "application/pdf", "text/html", ""]
)
def test_data_url_mime_not_allowed(sample, mime):
    _, png = sample
    fails("unsupported_image_type", data_url(png, mime))  # I2


def test_data_url_malformed(sample):
    _, png = sample
    fails("invalid_image_url", "data:image/png;base64")  # no comma
    fails("invalid_image_url", "data:image/png," + base64.b64encode(png).decode())  # not base64


def test_data_url_decoded_by_magic_bytes(sample, encode_image):
    image, png = sample
    # I3: a PNG labelled JPEG decodes as the PNG it is; the allowlist applies to the real format.
    assert np.array_equal(pixels(load_image(data_url(png, "image/jpeg"))), pixels(image))
    fails("unsupported_image_type", data_url(encode_image(image, "TIFF"), "image/png"))
    assert load_image(data_url(png, "IMAGE/PNG")).size == image.size  # MIME is case-insensitive


def test_data_url_size_checked_before_decoding(monkeypatch):
    # I4: refused from the string length; base64 decoding never runs.
    def no_decode(*args, **kwargs):
        raise AssertionError("decoded an oversized payload")

    monkeypatch.setattr(media_module.base64, "b64decode", no_decode)
    policy = MediaPolicy(max_bytes=3000)
    fails("image_too_large", "data:image/png;base64," + "A" * 4004, policy)


def test_data_url_just_under_limit_is_decoded(sample):
    _, png = sample
    policy = MediaPolicy(max_bytes=len(png))
    assert load_image(data_url(png), policy).size == (8, 6)
    fails("image_too_large", data_url(png + b"\0" * 3), policy)


def test_raw_bytes_size_limit(sample):
    _, png = sample
    fails("image_too_large", png, MediaPolicy(max_bytes=len(png) - 1))


# ------------------------------------------------------------------------- corrupt images, bombs


def test_truncated_and_corrupt(sample, encode_image, tmp_path):
    image, png = sample
    big = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    jpeg = encode_image(big, "JPEG")
    cases = [png[: len(png) // 2], jpeg[: len(jpeg) // 2], b"\x89PNG\r\n\x1a\n" + b"\0" * 50]
    cases.append(jpeg[:200] + b"\xff" * 100 + jpeg[300:])  # garbage in the scan
    path = tmp_path / "secret-name.png"
    for data in cases:
        path.write_bytes(data)
        for source in (data, str(path)):
            try:
                load_image(source)
            except ImageError as err:  # I5: fixed message, never the path or PIL's text
                assert err.code == "invalid_image_format"
                assert "secret" not in err.message and "PIL" not in err.message
                assert err.message == media_policy.MSG_FORMAT
            else:
                # A damaged JPEG scan may still decode (the codec conceals errors); then it is an
                # image of the right size, never a crash.
                assert data[:3] == b"\xff\xd8\xff"
    fails("invalid_image_format", b"not an image at all")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds (almost) no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 100)
    sig = b"\x89PNG\r\n\x1a\n"
    return sig + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_from_header(monkeypatch):
    # I6: 50k x 50k in a tiny file, and 9k x 9k (below PIL's own bomb limit, above ours).
    def no_load(self, *args, **kwargs):
        raise AssertionError("pixels decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    for w, h in [(50_000, 50_000), (9000, 9000), (64_000_001, 1)]:
        data = png_header_only(w, h)
        assert len(data) < 200
        fails("image_too_large", data)


def test_max_pixels_applies_to_pil_input():
    image = Image.new("RGB", (100, 100))
    fails("image_too_large", image, MediaPolicy(max_pixels=9999))
    assert load_image(image, MediaPolicy(max_pixels=10_000)).size == (100, 100)


@pytest.mark.parametrize("size", [(1, 1), (1, 10000), (10000, 1)])
def test_extreme_sizes(encode_image, size):
    # I7: decodes and tiles without error.
    image = load_image(encode_image(Image.new("RGB", size, (10, 20, 30)), "PNG"))
    pv = pixel_values(image)
    assert pv.shape == (num_tiles(*size), 3, 448, 448)


# ----------------------------------------------------------------------------------------- modes


def _modes(encode_image) -> dict[str, bytes]:
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    p_trns = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    p_trns.info["transparency"] = 0
    return {
        "L": encode_image(rgb.convert("L"), "PNG"),
        "1": encode_image(rgb.convert("1"), "PNG"),
        "LA": encode_image(rgb.convert("LA"), "PNG"),
        "RGBA": encode_image(Image.merge("RGBA", (*rgb.split(), rgb.convert("L"))), "PNG"),
        "P+tRNS": encode_image(p_trns, "PNG", transparency=0),
        "CMYK": encode_image(rgb.convert("CMYK"), "JPEG"),
        "L-jpeg": encode_image(rgb.convert("L"), "JPEG"),
        "RGBA-webp": encode_image(rgb.convert("RGBA"), "WEBP", lossless=True),
        "BMP": encode_image(rgb, "BMP"),
    }


def test_modes_match_lmdeploy(encode_image):
    # I8: every mode becomes RGB exactly as LMDeploy's open().convert("RGB") does, every time.
    for name, data in _modes(encode_image).items():
        out = load_image(data)
        assert out.mode == "RGB", name
        assert np.array_equal(pixels(out), lmdeploy_rule(data)), name
        assert np.array_equal(pixels(out), pixels(load_image(data))), name


def test_alpha_is_dropped_not_composited(encode_image):
    data = encode_image(Image.new("RGBA", (3, 3), (10, 20, 30, 0)), "PNG")
    assert load_image(data).getpixel((0, 0)) == (10, 20, 30)
    la = encode_image(Image.new("LA", (3, 3), (77, 0)), "PNG")
    assert load_image(la).getpixel((0, 0)) == (77, 77, 77)


def test_palette_transparency_uses_palette_colour(encode_image):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([200, 10, 10, 0, 0, 255] + [0] * 762)
    data = encode_image(image, "PNG", transparency=0)
    assert load_image(data).getpixel((0, 0)) == (200, 10, 10)


def test_16bit_grayscale_is_scaled_not_clipped(encode_image):
    values = np.array([[0, 0x1234, 0x80FF, 0xFFFF]], dtype=np.uint16)
    data = encode_image(Image.fromarray(values), "PNG")
    assert Image.open(__import__("io").BytesIO(data)).mode.startswith("I;16")
    out = pixels(load_image(data))
    assert out[0, :, 0].tolist() == [0, 0x12, 0x80, 0xFF]
    assert np.array_equal(out[..., 0], out[..., 2])  # gray in all channels


def test_animated_first_frame(encode_image):
    red, blue = Image.new("RGB", (5, 5), (255, 0, 0)), Image.new("RGB", (5, 5), (0, 0, 255))
    for fmt, kwargs in [("GIF", {}), ("WEBP", {"lossless": True})]:
        data = encode_image(red, fmt, save_all=True, append_images=[blue], duration=100, **kwargs)
        assert Image.open(__import__("io").BytesIO(data)).n_frames == 2
        assert load_image(data).getpixel((2, 2)) == (255, 0, 0), fmt


def test_exif_orientation_not_applied(encode_image):
    # LMDeploy ignores EXIF orientation; so do we (same pixels for the model under both).
    image = Image.new("RGB", (40, 20), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode_image(image, "JPEG", exif=exif)
    out = load_image(data)
    assert out.size == (40, 20)
    assert np.array_equal(pixels(out), lmdeploy_rule(data))


# ----------------------------------------------------------------------------------- local files


def test_local_files_refused_by_server_policy(sample, tmp_path):
    # I17 with local files off: every spelling refused with the same message, existing or not.
    _, png = sample
    path = tmp_path / "a.png"
    path.write_bytes(png)
    for source in [str(path), f"file://{path}", "/etc/passwd", "file:///etc/passwd", "../../x.png",
                   "file:///root/%2e%2e/etc/passwd", Path(path)]:  # fmt: skip
        err = fails("invalid_image_url", source, SERVER)
        assert err.message == media_policy.MSG_LOCAL_DENIED


def test_file_url_with_host_refused(sample, tmp_path):
    _, png = sample
    (tmp_path / "a.png").write_bytes(png)
    fails("invalid_image_url", f"file://example.com{tmp_path}/a.png")
    fails("invalid_image_url", "file:relative.png")


def test_unknown_schemes_refused():
    for url in ["gopher://127.0.0.1/", "ftp://example.com/a.png", "jar:file:///x!/y", "dict://x/"]:
        fails("invalid_image_url", url)


@pytest.fixture
def root(tmp_path, sample):
    """tmp/root/{in.png, sub/in2.png, link-out -> ../outside.png, link-in -> in.png,
    dirlink -> ..}"""
    _, png = sample
    base = tmp_path / "root"
    (base / "sub").mkdir(parents=True)
    (base / "in.png").write_bytes(png)
    (base / "sub" / "in2.png").write_bytes(png)
    (tmp_path / "outside.png").write_bytes(png)
    os.symlink(tmp_path / "outside.png", base / "link-out")
    os.symlink(base / "in.png", base / "link-in")
    os.symlink(tmp_path, base / "dirlink")
    return base


def test_local_root_confines(root):
    policy = MediaPolicy(allow_local_files=False, local_root=str(root))
    fails("invalid_image_url", str(root / "in.png"), policy)  # local files still off
    policy = MediaPolicy(local_root=str(root))
    for ok in [str(root / "in.png"), "in.png", "sub/in2.png", "sub/../in.png",
               str(root / "link-in"), f"file://{root}/sub/in2.png"]:  # fmt: skip
        assert load_image(ok, policy).size == (8, 6), ok
    outside = root.parent / "outside.png"
    for bad in [str(outside), "../outside.png", "sub/../../outside.png", str(root / "link-out"),
                "dirlink/outside.png", f"file://{root}/%2e%2e/outside.png", "/etc/passwd",
                f"file://{root}/../outside.png"]:  # fmt: skip
        err = fails("invalid_image_url", bad, policy)
        assert str(root.parent) not in err.message


def test_special_files_refused(root):
    policy = MediaPolicy(local_root=str(root))
    os.mkfifo(root / "fifo")
    fails("invalid_image_url", str(root / "fifo"), policy)  # returns at once: no blocking open
    fails("invalid_image_url", str(root / "sub"), policy)  # a directory
    fails("invalid_image_url", str(root / "missing.png"), policy)
    fails("invalid_image_url", "in.png\0.txt", policy)
    fails("invalid_image_url", "/dev/zero")  # not a regular file, even without a root


def test_local_file_size_limit(root, sample):
    _, png = sample
    fails("image_too_large", str(root / "in.png"), MediaPolicy(max_bytes=len(png) - 1))


# ---------------------------------------------------------------------------------- policy, pool


def test_policy_is_frozen_and_normalised():
    policy = MediaPolicy(allowed_domains=["Example.COM.", "bücher.de"], allowed_formats=["png"])
    assert policy.allowed_domains == ("example.com", "xn--bcher-kva.de")
    assert policy.allowed_formats == ("PNG",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_bytes = 1  # type: ignore[misc]
    assert MediaPolicy().allow_local_files and not MediaPolicy().allow_private_networks
    server = MediaPolicy.server_default(max_bytes=10)
    assert not server.allow_local_files and not server.allow_private_networks
    assert server.max_bytes == 10
    with pytest.raises(ValueError):
        MediaPolicy(timeout_s=0)


def test_decoding_in_a_thread_pool(encode_image):
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)) for _ in range(16)]
    blobs = [
        encode_image(im, fmt)
        for im, fmt in zip(images, ["PNG", "WEBP", "BMP", "GIF"] * 4, strict=True)
    ]
    serial = [pixels(load_image(b)) for b in blobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = [pixels(im) for im in pool.map(load_image, blobs)]
    assert all(np.array_equal(a, b) for a, b in zip(serial, parallel, strict=True))


@pytest.mark.parametrize("name", ["\ud800.png", "a\udfffb.jpg", "\udc80"])
def test_a_path_with_a_lone_surrogate_is_an_image_error(name, tmp_path):
    with pytest.raises(ImageError) as info:
        load_image(str(tmp_path / name))
    assert info.value.code == "invalid_image_url"
