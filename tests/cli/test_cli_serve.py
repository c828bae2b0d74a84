"""`vlmdeploy serve api_server`: flags generated from the config dataclasses, LMDeploy's names, and
clean failures. The pipeline and uvicorn are replaced (FakePipeline test double, a recording
`serve`), so these tests check the command line, not the model."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import re
import subprocess
import sys

import pytest
from fake_pipeline import FakePipeline

import vlmdeploy.serve.server as server_module
from vlmdeploy.cli import serve as serve_cli
from vlmdeploy.cli.main import main
from vlmdeploy.messages import PytorchEngineConfig
from vlmdeploy.serve.config import ServerConfig

LMDEPLOY_FLAGS = ["--server-name", "--server-port", "--tp", "--backend", "--session-len",
                  "--max-batch-size", "--cache-max-entry-count", "--model-name", "--api-keys",
                  "--allow-origins", "--max-concurrent-requests", "--allowed-media-domains",
                  "--allowed-local-media-path", "--reasoning-parser", "--log-level",
                  "--eager-mode", "--enable-prefix-caching", "--max-prefill-token-num", "--dtype",
                  "--device", "--cache-block-seq-len"]


def option_strings() -> set[str]:
    """Every option `serve api_server --help` lists."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["serve", "api_server", "--help"])
    return set(re.findall(r"(--[a-z][a-z0-9-]+)", out.getvalue()))


@pytest.fixture
def launched(monkeypatch):
    """Run `main` up to the server start; returns what the server would have been given."""
    calls = {}

    def fake_load(model, engine, model_name, **options):
        calls.update(model=model, engine=engine, model_name=model_name, options=options)
        return FakePipeline()

    def fake_serve(pipe, config, media_policy=None):
        calls.update(pipe=pipe, config=config)
        return 0

    monkeypatch.setattr(serve_cli, "load_pipeline", fake_load)
    monkeypatch.setattr(server_module, "serve", fake_serve)
    return calls


def test_lmdeploy_flag_names_exist():
    assert set(LMDEPLOY_FLAGS) <= option_strings()


def test_every_implemented_engine_field_has_a_flag():
    flags = option_strings()
    unimplemented = set(PytorchEngineConfig._UNIMPLEMENTED) - {"tp"}
    for field in dataclasses.fields(PytorchEngineConfig):
        if field.name in unimplemented or field.name in serve_cli.ENGINE_SKIP:
            continue
        if "dict" in str(field.type):  # no flag for dict-typed fields
            continue
        name = serve_cli.ENGINE_RENAME.get(field.name, field.name).replace("_", "-")
        assert f"--{name}" in flags, field.name
    # LMDeploy's flags for what vlmdeploy does not implement are there too, and refuse a value
    # (tests/cli/test_lmdeploy_compat.py)
    for name in ("--quant-policy", "--adapters", "--dp"):
        assert name in flags


def test_every_server_field_has_a_flag():
    flags = option_strings()
    for field in dataclasses.fields(ServerConfig):
        assert "--" + field.name.replace("_", "-") in flags


def test_flags_reach_the_configs(launched):
    rc = main(["serve", "api_server", "/models/x", "--server-name", "127.0.0.1", "--server-port",
               "8000", "--tp", "1", "--session-len", "4096", "--max-batch-size", "8",
               "--cache-max-entry-count", "0.5", "--eager-mode", "--enable-prefix-caching",
               "--max-prefill-token-num", "2048", "--dtype", "bfloat16", "--device", "cpu",
               "--cache-block-seq-len", "32", "--model-name", "served", "--api-keys", "k1", "k2",
               "--allow-origins", "https://a.example", "--max-concurrent-requests", "7",
               "--allowed-media-domains", "images.example", "--allowed-local-media-path", "/srv",
               "--reasoning-parser", "intern-s1", "--log-level", "INFO",
               "--cudagraph-capture-batch-sizes", "1", "2", "4"])
    assert rc == 0
    engine, config = launched["engine"], launched["config"]
    assert (launched["model"], launched["model_name"]) == ("/models/x", "served")
    assert (engine.session_len, engine.max_batch_size, engine.cache_max_entry_count) == (
        4096, 8, 0.5)
    assert engine.eager_mode and engine.enable_prefix_caching
    assert (engine.max_prefill_token_num, engine.dtype, engine.device_type, engine.block_size) == (
        2048, "bfloat16", "cpu", 32)
    assert engine.cudagraph_capture_batch_sizes == [1, 2, 4]
    assert (config.server_name, config.server_port, config.api_keys) == (
        "127.0.0.1", 8000, ("k1", "k2"))
    assert config.allow_origins == ("https://a.example",)
    assert config.max_concurrent_requests == 7
    assert config.allowed_media_domains == ("images.example",)
    assert config.allowed_local_media_path == "/srv"
    assert config.reasoning_parser == "intern-s1" and config.log_level == "INFO"


@pytest.mark.parametrize("backend", ["mp", "ray"])
def test_tensor_parallel_flags_reach_the_engine(launched, backend):
    rc = main(["serve", "api_server", "/models/x", "--tp", "8",
               "--distributed-executor-backend", backend])
    assert rc == 0
    engine = launched["engine"]
    assert (engine.tp, engine.distributed_executor_backend) == (8, backend)


def test_defaults_are_lmdeploys(launched):
    assert main(["serve", "api_server", "/models/x"]) == 0
    config, engine = launched["config"], launched["engine"]
    assert (config.server_name, config.server_port, config.backend) == ("0.0.0.0", 23333,
                                                                        "pytorch")
    assert engine == PytorchEngineConfig()


def test_turbomind_is_accepted_with_a_warning(launched, caplog):
    caplog.set_level(logging.WARNING)
    assert main(["serve", "api_server", "/models/x", "--backend", "turbomind"]) == 0
    assert "turbomind" in caplog.text and "PyTorch" in caplog.text
    assert isinstance(launched["engine"], PytorchEngineConfig)


@pytest.mark.parametrize("args,words", [
    (["--cache-max-entry-count", "1.5"], "cache_max_entry_count"),
    (["--session-len", "abc"], "session-len"),
    (["--dtype", "int3"], "dtype"),
    (["--device", "tpu"], "device"),
    (["--backend", "vllm"], "backend"),
    (["--reasoning-parser", "nope"], "reasoning parser"),
    (["--server-port", "70000"], "server_port"),
    (["--tp", "0"], "tp"),
])
def test_bad_values_exit_2_with_a_message(launched, capsys, args, words):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "api_server", "/models/x", *args])
    assert exc.value.code == 2
    assert words in capsys.readouterr().err
    assert "pipe" not in launched


def test_model_is_optional_only_with_an_embedded_default(launched, capsys, monkeypatch):
    import vlmdeploy.assets as assets

    def missing():
        raise FileNotFoundError("gone")

    monkeypatch.setattr(assets, "default_model_path", missing)
    with pytest.raises(SystemExit) as exc:
        main(["serve", "api_server"])
    assert exc.value.code == 2 and "MODEL" in capsys.readouterr().err
    monkeypatch.setattr(assets, "default_model_path", lambda: "/embedded/model")
    assert main(["serve", "api_server"]) == 0
    assert launched["model"] == "/embedded/model"
    assert main(["serve", "api_server", assets.DEFAULT_MODEL_NAME]) == 0  # its name works too
    assert launched["model"] == "/embedded/model"


def test_load_failure_exits_1_with_one_line(monkeypatch, capsys):
    def broken(*_):
        raise FileNotFoundError("no config.json in /nowhere")

    monkeypatch.setattr(serve_cli, "load_pipeline", broken)
    assert main(["serve", "api_server", "/nowhere"]) == 1
    err = capsys.readouterr().err
    assert "cannot load the model" in err and "Traceback" not in err


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "vlmdeploy", "serve", "api_server", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "--server-port" in result.stdout and "--cache-max-entry-count" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "vlmdeploy", "serve", "api_server",
                          "/does/not/exist", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
