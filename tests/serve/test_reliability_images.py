"""RELIABILITY I10: the image embedding cache is keyed by what the model sees. Images whose encoded
or raw bytes agree but whose shape, mode or palette differ get different keys (an attacker must
not be able to make a request reuse another image's embedding), while images that decode to the
same RGB pixels share one. Keys come from the server's preparation path (`pipe.prepare` under the
server's media policy) on the real pipeline."""

from __future__ import annotations

import asyncio
import base64
import io

from PIL import Image

from vlmdeploy.serve.app import media_policy_for
from vlmdeploy.serve.config import ServerConfig

RAW = bytes(range(256)) * 48  # 12,288 bytes: 64x64 RGB, 32x128 RGB, 128x96 L or P


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def palette_image(palette: list[int]) -> Image.Image:
    image = Image.frombytes("P", (128, 96), RAW)
    image.putpalette(palette)
    return image


def cache_key(pipe, url: str) -> str:
    image = {"url": url, "max_dynamic_patch": 1}  # one tile: the test is about keys
    prompt = [{"role": "user", "content": [{"type": "image_url", "image_url": image},
                                           {"type": "text", "text": "what is it?"}]}]
    policy = media_policy_for(ServerConfig())
    prepared = asyncio.run(pipe.prepare(prompt, media_policy=policy))
    (image,) = prepared.images
    return image.content_hash


def test_i10_same_bytes_in_another_shape_mode_or_palette_get_another_key(real_pipe):
    inverted = [v for i in range(256) for v in (255 - i, 255 - i, 255 - i)]
    red = [v for i in range(256) for v in (i, 0, 0)]
    images = {
        "rgb 64x64": Image.frombytes("RGB", (64, 64), RAW),
        "rgb 32x128": Image.frombytes("RGB", (32, 128), RAW),
        "rgb 128x32": Image.frombytes("RGB", (128, 32), RAW),
        "L 128x96": Image.frombytes("L", (128, 96), RAW),
        "P inverted grey palette": palette_image(inverted),
        "P red palette": palette_image(red),
    }
    keys = {name: cache_key(real_pipe, data_url(image)) for name, image in images.items()}
    assert len(set(keys.values())) == len(keys), keys


def test_i10_the_key_follows_the_pixels_the_model_sees(real_pipe):
    """One picture in two encodings, or in two modes that convert to the same RGB pixels, is one
    embedding: keys are taken after decoding and conversion to RGB."""
    image = Image.frombytes("RGB", (64, 64), RAW)
    assert cache_key(real_pipe, data_url(image, "PNG")) == cache_key(real_pipe,
                                                                     data_url(image, "BMP"))
    grey = [v for i in range(256) for v in (i, i, i)]
    assert cache_key(real_pipe, data_url(palette_image(grey))) == cache_key(
        real_pipe, data_url(Image.frombytes("L", (128, 96), RAW)))
