"""Abuse cases found in review, against the real pipeline on a tiny checkpoint: oversized image
requests are refused before tiling, seeded choices fetch their images once, and an engine that dies
mid-request answers 503 and marks the server dead."""

from __future__ import annotations

import base64
import io

from fastapi.testclient import TestClient
from PIL import Image
from serve_helpers import assert_error, chat

from vlmdeploy import PytorchEngineConfig, pipeline
from vlmdeploy.frontend import images as images_module
from vlmdeploy.frontend.images import ImagePreparer
from vlmdeploy.serve import ServerConfig, create_app


def png_url(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_part(url: str, **extra) -> dict:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def test_images_that_cannot_fit_are_refused_before_tiling(real_pipe, monkeypatch):
    tiled = []
    real_tile = images_module.raw_tiles
    monkeypatch.setattr(images_module, "raw_tiles",
                        lambda *a, **k: tiled.append(1) or real_tile(*a, **k))
    client = TestClient(create_app(real_pipe, ServerConfig()))
    big = png_url(3584, 3584)
    content = [image_part(big, max_dynamic_patch=64) for _ in range(4)] + [
        {"type": "text", "text": "describe"}]
    r = client.post("/v1/chat/completions", json=chat(content, max_tokens=4))
    assert_error(r, 400, "context_length_exceeded")
    assert tiled == []  # refused from the image sizes alone


def test_seeded_choices_load_their_images_once(real_pipe, monkeypatch):
    loads = []
    real_load = ImagePreparer._load
    monkeypatch.setattr(ImagePreparer, "_load",
                        lambda self, *a: loads.append(1) or real_load(self, *a))
    client = TestClient(create_app(real_pipe, ServerConfig()))
    body = chat([image_part(png_url(300, 300)), {"type": "text", "text": "hi"}], n=4, seed=7,
                temperature=0.9, max_tokens=3)
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 4 and len(loads) == 1


def test_engine_death_during_a_request_is_503_and_marks_the_server_dead(tiny_ckpts):
    with pipeline(tiny_ckpts["original"], PytorchEngineConfig(session_len=600)) as pipe:
        def broken():
            raise RuntimeError("injected fault")

        pipe.engine.core.step = broken
        client = TestClient(create_app(pipe, ServerConfig()))
        r = client.post("/v1/chat/completions", json=chat("hi", max_tokens=3))
        assert_error(r, 503)
        assert client.get("/health").status_code == 503
