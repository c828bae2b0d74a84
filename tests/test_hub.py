"""Model ids through `huggingface_hub` (`vlmdeploy.hub`): the cache, offline mode, `download_dir`,
`revision`, and the served name.

The cache is written by `huggingface_hub` itself: a loopback HTTP server answers the few hub routes
`snapshot_download` asks for (`HF_ENDPOINT` points there), serving the embedded model's files, so
the real download code lays out `models--org--name/{blobs,refs,snapshots}` with no internet. The
tests then resolve offline from that cache."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from huggingface_hub import constants

from vlmdeploy.assets import default_model_path
from vlmdeploy.hub import ModelNotFound, looks_like_model_id, resolve_model_path
from vlmdeploy.messages import PytorchEngineConfig

REPO = "OpenGVLab/InternVL3_5-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
ROOT = Path(__file__).resolve().parents[1]


class FakeHub:
    """The hub routes `snapshot_download` uses: the repo's revision and tree, and each file."""

    def __init__(self, folder: Path):
        self.files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self):
                path = self.path.split("?")[0]
                hub.requests.append(path)
                api, resolve = f"/api/models/{REPO}", f"/{REPO}/resolve/"
                if path.startswith(api + "/tree/"):
                    tree = [{"type": "file", "path": name, "size": len(data),
                             "oid": hashlib.sha1(data).hexdigest()}
                            for name, data in hub.files.items()]
                    return self.reply(json.dumps(tree).encode())
                if path.startswith(api):
                    siblings = [{"rfilename": name} for name in hub.files]
                    return self.reply(json.dumps({"id": REPO, "sha": COMMIT,
                                                  "siblings": siblings}).encode())
                name = path[len(resolve):].partition("/")[2] if path.startswith(resolve) else ""
                if name in hub.files:
                    data = hub.files[name]
                    return self.reply(data, {"X-Repo-Commit": COMMIT,
                                             "ETag": f'"{hashlib.sha256(data).hexdigest()}"'})
                self.send_response(404)
                self.end_headers()

            do_HEAD = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> FakeHub:
    repo = tmp_path_factory.mktemp("repo")
    for item in default_model_path().iterdir():
        shutil.copy(item, repo / item.name)
    (repo / "pytorch_model.bin").write_bytes(b"pickled weights: never fetched")
    (repo / "modeling_internvl.py").write_text("raise SystemExit('never fetched')")
    server = FakeHub(repo)
    yield server
    server.server.shutdown()


def resolve_in_subprocess(hub: FakeHub, cache: Path, revision: str | None = None) -> str:
    """`resolve_model_path(REPO)` in a fresh process whose hub endpoint is the fake hub (the
    endpoint is read when huggingface_hub is imported)."""
    code = ("import sys; from vlmdeploy.hub import resolve_model_path; "
            "from vlmdeploy.messages import PytorchEngineConfig; "
            f"print(resolve_model_path({REPO!r}, PytorchEngineConfig("
            f"download_dir={str(cache)!r}, revision={revision!r})))")
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def cache(hub, tmp_path_factory) -> Path:
    """A cache that huggingface_hub filled through vlmdeploy's resolution (a download)."""
    root = tmp_path_factory.mktemp("hf-cache")
    path = Path(resolve_in_subprocess(hub, root))
    assert path == root / "models--OpenGVLab--InternVL3_5-tiny" / "snapshots" / COMMIT
    return root


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_a_download_fills_the_hubs_own_cache_with_what_vlmdeploy_reads(cache):
    repo = cache / "models--OpenGVLab--InternVL3_5-tiny"
    assert (repo / "refs" / "main").read_text() == COMMIT
    snapshot = repo / "snapshots" / COMMIT
    assert {p.name for p in snapshot.iterdir()} == {p.name for p in default_model_path().iterdir()}
    assert (snapshot / "model.safetensors").is_symlink()  # blobs + links: the hub's layout
    assert not (snapshot / "pytorch_model.bin").exists()  # no pickles, no checkpoint code
    assert not (snapshot / "modeling_internvl.py").exists()


def test_offline_the_cache_resolves_by_id_and_revision(cache, offline):
    want = str(cache / "models--OpenGVLab--InternVL3_5-tiny" / "snapshots" / COMMIT)
    assert resolve_model_path(REPO, PytorchEngineConfig(download_dir=str(cache))) == want
    assert resolve_model_path(REPO, PytorchEngineConfig(download_dir=str(cache),
                                                         revision=COMMIT)) == want
    with pytest.raises(ModelNotFound, match="v9.*offline"):
        resolve_model_path(REPO, PytorchEngineConfig(download_dir=str(cache), revision="v9"))


def test_offline_an_id_not_in_the_cache_is_a_clear_error(tmp_path, offline):
    with pytest.raises(ModelNotFound) as err:
        resolve_model_path("OpenGVLab/InternVL3_5-8B", PytorchEngineConfig(
            download_dir=str(tmp_path)))
    assert "OpenGVLab/InternVL3_5-8B" in str(err.value) and str(tmp_path) in str(err.value)


def test_paths_and_the_embedded_model_are_not_ids(tmp_path):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path(None) == str(default_model_path())
    assert resolve_model_path("/no/such/dir") == "/no/such/dir"  # the loader reports it
    assert looks_like_model_id(REPO)
    assert not any(map(looks_like_model_id, ["a", "a/b/c", "./a", "/a/b", "~/a", "a/"]))


def test_pipeline_and_serve_take_an_id(cache, offline, monkeypatch):
    sys.path.insert(0, str(ROOT / "tests" / "serve"))
    from fake_pipeline import FakePipeline

    from vlmdeploy import pipeline

    snapshot = cache / "models--OpenGVLab--InternVL3_5-tiny" / "snapshots" / COMMIT
    with pipeline(REPO, backend_config=PytorchEngineConfig(
            download_dir=str(cache), session_len=512, device_type="cpu")) as pipe:
        assert pipe.model_path == str(snapshot) and pipe.model_name == REPO
        assert pipe("hi").generate_token_len > 0

    import vlmdeploy.serve.server as server_module
    from vlmdeploy.cli import serve as serve_cli
    from vlmdeploy.cli.main import main

    seen = {}
    monkeypatch.setattr(serve_cli, "load_pipeline", lambda model, engine, name, **kw: (
        seen.update(model=model, name=name, engine=engine) or FakePipeline()))
    monkeypatch.setattr(server_module, "serve", lambda *a, **k: 0)
    assert main(["serve", "api_server", REPO, "--download-dir", str(cache),
                 "--revision", COMMIT]) == 0
    assert (seen["model"], seen["name"]) == (str(snapshot), REPO)
