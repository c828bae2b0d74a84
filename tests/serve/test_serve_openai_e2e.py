"""The seed document's client code, unchanged but for the image URL, against a real
`python -m vlmdeploy serve api_server <tiny checkpoint>` process on 127.0.0.1 (CPU).

The seed fetches its image from a public https URL; machines running the suite have no internet, so
the same `image_url` part carries a base64 data URL instead. Everything else (official `openai`
package, `models.list()`, `chat.completions.create` with temperature 0.8 and top_p 0.8) is the
seed's code, streaming and not.
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from PIL import Image
from serve_helpers import free_port

SESSION_LEN = 512  # one 448x448 tile (256 tokens) + text leaves ~230 tokens to generate on CPU


def _image_data_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (448, 448), (200, 120, 40)).save(buf, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def server_url(tiny_checkpoint: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmdeploy", "serve", "api_server", str(tiny_checkpoint),
         "--server-name", "127.0.0.1", "--server-port", str(port), "--device", "cpu",
         "--session-len", str(SESSION_LEN), "--tp", "1", "--backend", "pytorch"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not become healthy"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, -15), proc.stdout.read()


def _messages() -> list[dict]:
    return [{
        'role':
        'user',
        'content': [{
            'type': 'text',
            'text': 'describe this image',
        }, {
            'type': 'image_url',
            'image_url': {
                'url':
                _image_data_url(),
            },
        }],
    }]


def test_seed_client_code(server_url):
    client = OpenAI(api_key='YOUR_API_KEY', base_url=f'{server_url}/v1')
    model_name = client.models.list().data[0].id
    response = client.chat.completions.create(
        model=model_name,
        messages=_messages(),
        temperature=0.8,
        top_p=0.8)
    print(response)
    assert model_name == response.model
    (choice,) = response.choices
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens > 256  # the image's tokens are in the prompt
    assert response.usage.total_tokens <= SESSION_LEN


def test_seed_client_code_streaming(server_url):
    client = OpenAI(api_key='YOUR_API_KEY', base_url=f'{server_url}/v1')
    model_name = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model_name,
        messages=_messages(),
        temperature=0.8,
        top_p=0.8,
        stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert chunks[0].choices[0].delta.role == "assistant"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.prompt_tokens > 256
    text_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert 0 < len(text_chunks) <= usage.completion_tokens  # one chunk per token at most
