"""Images → tiles without an engine: deferred tiles are picklable descriptions that make exactly
the tiles eager tiling makes, content hashes keep their values, and the preparer defers or skips
work only for images the engine holds."""

from __future__ import annotations

import base64
import io
import pickle

import pytest
import torch
from PIL import Image

from vlmdeploy.frontend import images as images_module
from vlmdeploy.frontend.images import (
    ImagePreparer,
    ImageTiles,
    InlineImageTiles,
    content_hash,
    tiles_of,
)
from vlmdeploy.frontend.prompt import ImageRef
from vlmdeploy.vl.media import MediaPolicy, load_image
from vlmdeploy.vl.tiling import TilingParams

PARAMS = TilingParams(12, 1, 448, True)


def pattern(w: int, h: int) -> Image.Image:
    return Image.frombytes("RGB", (w, h), bytes((i * 7) % 256 for i in range(w * h * 3)))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def test_content_hashes_keep_their_values():
    """Cache keys are the sha256 of the pixels and ``repr((mode, size, (max_num, min_num,
    image_size, use_thumbnail)))``; these digests were taken with the parameters as that tuple."""
    img = pattern(60, 30)
    assert content_hash(img, PARAMS) == "6e44ca2ea1e24531f1c232c97657329d"
    assert content_hash(img, TilingParams(6, 1, 448, False)) == "e4bda0ca9d2cb1ff493067591605c3ad"
    assert PARAMS.key == (12, 1, 448, True) and repr(PARAMS.key) == "(12, 1, 448, True)"


def test_an_image_tile_source_pickles_and_makes_the_same_tiles():
    img = pattern(600, 300)  # 2x1 grid + thumbnail
    source = pickle.loads(pickle.dumps(ImageTiles(img, PARAMS)))
    tiles = source.make_tiles()
    assert tiles.dtype == torch.uint8 and tiles.shape == (3, 448, 448, 3)
    assert torch.equal(tiles, tiles_of(img, PARAMS))


@pytest.mark.parametrize("kind", ["data_url", "bytes", "bytearray", "memoryview"])
def test_an_inline_tile_source_pickles_and_makes_the_same_tiles(kind):
    img = pattern(200, 640)  # 1x3 grid + thumbnail
    raw = png_bytes(img)
    src = {"data_url": data_url(img), "bytes": raw, "bytearray": bytearray(raw),
           "memoryview": memoryview(raw)}[kind]
    # a resolver is a callable that need not pickle; an inline source never reaches the network
    policy = MediaPolicy(resolver=lambda host, port: ["127.0.0.1"])
    made = InlineImageTiles(src, policy, TilingParams(6, 1, 448, True))
    again = pickle.loads(pickle.dumps(made))
    assert again.policy.resolver is None and again.policy.max_pixels == policy.max_pixels
    expected = tiles_of(load_image(src, policy), TilingParams(6, 1, 448, True))
    assert torch.equal(again.make_tiles(), expected)


class Seen:
    """Stands in for the engine's ``has_cached_image``: what it 'holds' is set by the test."""

    def __init__(self):
        self.held: set[str] = set()

    def __call__(self, digest: str) -> bool:
        return digest in self.held


@pytest.fixture()
def preparer():
    return ImagePreparer(PARAMS, tokens_per_tile=256, session_len=4096, is_cached=Seen())


def test_a_held_image_is_hashed_but_not_tiled(preparer):
    img = pattern(600, 300)
    (first,) = preparer.prepare([ImageRef(img)])
    assert first.pixel_values is not None and first.deferred is None and first.num_tiles == 3
    preparer.is_cached.held.add(first.content_hash)
    (again,) = preparer.prepare([ImageRef(img)])
    assert again.pixel_values is None and isinstance(again.deferred, ImageTiles)
    assert again.content_hash == first.content_hash and again.num_tiles == 3
    assert torch.equal(again.deferred.make_tiles(), first.pixel_values)


def test_a_held_inline_image_is_not_even_decoded(preparer, monkeypatch):
    url = data_url(pattern(600, 300))
    (first,) = preparer.prepare([ImageRef(url)])
    decodes = []
    real = images_module.load_image
    monkeypatch.setattr(images_module, "load_image",
                        lambda *a: decodes.append(1) or real(*a))
    preparer.is_cached.held.add(first.content_hash)
    (again,) = preparer.prepare([ImageRef(url)])
    assert decodes == [] and isinstance(again.deferred, InlineImageTiles)
    assert (again.content_hash, again.num_tiles) == (first.content_hash, first.num_tiles)
    assert torch.equal(again.deferred.make_tiles(), first.pixel_values) and decodes == [1]


def test_a_per_image_tile_limit_changes_the_parameters(preparer):
    assert preparer.params(ImageRef("x")) is PARAMS
    assert preparer.params(ImageRef("x", max_dynamic_patch=6)) == TilingParams(6, 1, 448, True)


def test_an_image_that_cannot_be_fetched_says_why_in_the_error_and_the_log(preparer, caplog):
    from vlmdeploy.errors import ImageError

    ref = ImageRef("http://127.0.0.1:9/cat.png", param="messages[0].content[1].image_url.url")
    with pytest.raises(ImageError) as err:
        preparer.prepare([ref], MediaPolicy.server_default())
    assert err.value.code == "invalid_image_url"
    assert err.value.message.endswith(": the host is a private, loopback or reserved address.")
    assert "127.0.0.1" not in err.value.message  # the reason never echoes the input
    logged = [r.getMessage() for r in caplog.records if r.name == "vlmdeploy"]
    assert any("messages[0].content[1].image_url.url" in m and "private" in m for m in logged)
