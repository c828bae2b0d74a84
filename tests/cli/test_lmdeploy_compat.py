"""LMDeploy 0.18's command line, all of it: every flag of `lmdeploy serve api_server` and
`lmdeploy chat` parses; flags with a meaning here act as in LMDeploy; the others say why they are
ignored or refused; a launch script written for LMDeploy runs with only the command name changed.

The flag lists below are LMDeploy 0.18's (read from its argument parser), each with a value it
accepts."""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
import time

import httpx
import pytest
from fake_pipeline import FakePipeline

import vlmdeploy.serve.server as server_module
from vlmdeploy.cli import serve as serve_cli
from vlmdeploy.cli.main import build_parser, main
from vlmdeploy.messages import PytorchEngineConfig

API_SERVER_FLAGS = [
    ("--server-name", "0.0.0.0"), ("--server-port", "23333"), ("--allow-origins", "*"),
    ("--allow-credentials",), ("--allow-methods", "*"), ("--allow-headers", "*"),
    ("--proxy-url", "http://proxy:8000"), ("--max-concurrent-requests", "64"),
    ("--allowed-media-domains", "images.example"), ("--backend", "turbomind"),
    ("--log-level", "WARNING"), ("--api-keys", "k1", "k2"), ("--ssl",), ("--model-name", "m"),
    ("--max-log-len", "100"), ("--disable-fastapi-docs",), ("--allow-terminate-by-client",),
    ("--enable-abort-handling",), ("--trust-remote-code",), ("--chat-template", "hf"),
    ("--tool-call-parser", "qwen3"), ("--reasoning-parser", "qwen3"), ("--revision", "main"),
    ("--download-dir", "/tmp/hf"), ("--generation-config", "auto"), ("--adapters", "a=/p"),
    ("--device", "cuda"), ("--eager-mode",), ("--empty-init",), ("--logprobs-mode", "raw_logits"),
    ("--dllm-block-length", "4"), ("--dllm-unmasking-strategy", "low_confidence_dynamic"),
    ("--dllm-denoising-steps", "4"), ("--dllm-confidence-threshold", "0.85"),
    ("--enable-return-routed-experts",), ("--distributed-executor-backend", "mp"),
    ("--kernel-block-size", "-1"), ("--prefix-cache-state-budget", "0"),
    ("--prefix-cache-decode-state-interval", "0"), ("--language-model-only",), ("--dtype", "auto"),
    ("--tp", "1"), ("--session-len", "8192"), ("--max-batch-size", "128"),
    ("--cache-max-entry-count", "0.8"), ("--num-gpu-blocks", "0"), ("--cache-block-seq-len", "64"),
    ("--enable-prefix-caching",), ("--max-prefill-token-num", "8192"), ("--quant-policy", "int8"),
    ("--model-format", "hf"), ("--hf-overrides", "{}"), ("--disable-metrics",), ("--dp", "1"),
    ("--ep", "1"), ("--enable-microbatch",), ("--enable-eplb",), ("--role", "Hybrid"),
    ("--migration-backend", "DLSlime"), ("--cudagraph-capture-batch-sizes", "1", "2"),
    ("--piecewise-cudagraph-max-tokens", "512"), ("--node-rank", "0"), ("--nnodes", "1"),
    ("--cp", "1"), ("--rope-scaling-factor", "0.0"), ("--num-tokens-per-iter", "0"),
    ("--max-prefill-iters", "1"), ("--async", "1"), ("--communicator", "nccl"),
    ("--moe-a2a-backend", "auto"), ("--dist-init-addr", "10.0.0.1:29500"),
    ("--vision-max-batch-size", "8"), ("--speculative-algorithm", "eagle3"),
    ("--speculative-draft-model", "/d"), ("--speculative-num-draft-tokens", "3"),
    ("--speculative-dflash-block-size", "4"), ("--kv-transfer-config", "{}"),
]
CHAT_FLAGS = [
    ("--backend", "pytorch"), ("--chat-template", "hf"), ("--revision", "main"),
    ("--download-dir", "/tmp/hf"), ("--trust-remote-code",), ("--adapters", "a=/p"),
    ("--device", "cuda"), ("--eager-mode",), ("--dllm-block-length", "4"),
    ("--prefix-cache-state-budget", "0"), ("--prefix-cache-decode-state-interval", "0"),
    ("--dtype", "auto"), ("--tp", "1"), ("--ep", "1"), ("--session-len", "8192"),
    ("--cache-max-entry-count", "0.8"), ("--enable-prefix-caching",), ("--quant-policy", "0"),
    ("--language-model-only",), ("--model-format", "hf"), ("--rope-scaling-factor", "0.0"),
    ("--communicator", "nccl"), ("--moe-a2a-backend", "auto"), ("--cp", "1"), ("--async", "1"),
    ("--speculative-algorithm", "eagle"), ("--speculative-draft-model", "/d"),
    ("--speculative-num-draft-tokens", "1"), ("--speculative-dflash-block-size", "4"),
]


@pytest.mark.parametrize("command,flags", [(["serve", "api_server"], API_SERVER_FLAGS),
                                           (["chat"], CHAT_FLAGS)], ids=["api_server", "chat"])
def test_every_lmdeploy_flag_parses(command, flags):
    argv = [*command, "OpenGVLab/InternVL3_5-8B", *(x for flag in flags for x in flag)]
    args = build_parser().parse_args(argv)  # argparse exits on an unknown flag or bad value
    assert args.model_path == "OpenGVLab/InternVL3_5-8B"


@pytest.fixture
def launched(monkeypatch):
    """`main` up to the server start, with the FakePipeline; returns what it was given."""
    calls = {}

    def fake_load(model, engine, model_name, **options):
        calls.update(model=model, engine=engine, model_name=model_name, options=options)
        return FakePipeline()

    def fake_serve(pipe, config, media_policy=None):
        calls.update(config=config)
        return 0

    monkeypatch.setattr(serve_cli, "load_pipeline", fake_load)
    monkeypatch.setattr(server_module, "serve", fake_serve)
    monkeypatch.setattr(serve_cli, "_cuda_available", lambda: True)
    return calls


def serve(*args: str) -> int:
    return main(["serve", "api_server", "/models/x", *args])


def test_flags_with_a_meaning_reach_the_server(launched, tmp_path, monkeypatch):
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    monkeypatch.setenv("SSL_KEYFILE", str(key))
    monkeypatch.setenv("SSL_CERTFILE", str(cert))
    assert serve("--allow-origins", "https://a.example", "--allow-credentials",
                 "--allow-methods", "GET", "--allow-headers", "X-A", "--ssl",
                 "--disable-fastapi-docs", "--disable-metrics", "--tool-call-parser", "qwen3",
                 "--api-keys", "--model-format", "hf", "--quant-policy", "0",
                 "--log-level", "WARN") == 0
    config = launched["config"]
    assert config.allow_credentials and config.allow_methods == ("GET",)
    assert config.allow_headers == ("X-A",) and config.ssl
    assert config.disable_fastapi_docs and config.disable_metrics
    assert config.tool_call_parser == "qwen3" and config.api_keys == ()
    assert launched["engine"] == PytorchEngineConfig()  # --model-format hf is what we read
    assert server_module.ssl_files(config) == {"ssl_keyfile": str(key),
                                              "ssl_certfile": str(cert)}


@pytest.mark.parametrize("value,expected", [("fp8", "fp8"), ("awq", "awq"), ("hf", None)])
def test_model_format_reaches_the_engine(launched, value, expected):
    assert serve("--model-format", value) == 0
    assert launched["engine"].model_format == expected


def test_chat_passes_model_format_to_the_engine(monkeypatch, capsys):
    import vlmdeploy

    seen = {}

    def fake_pipeline(model, backend_config=None, **options):
        seen["engine"] = backend_config
        raise RuntimeError("no model here")

    monkeypatch.setattr(vlmdeploy, "pipeline", fake_pipeline, raising=False)
    assert main(["chat", "/models/x", "--model-format", "fp8"]) == 1
    assert seen["engine"].model_format == "fp8"
    assert "no model here" in capsys.readouterr().err


def test_ssl_without_its_files_is_refused_before_loading(launched, monkeypatch, capsys):
    monkeypatch.delenv("SSL_KEYFILE", raising=False)
    monkeypatch.delenv("SSL_CERTFILE", raising=False)
    with pytest.raises(SystemExit) as exc:
        serve("--ssl")
    assert exc.value.code == 2 and "SSL_KEYFILE" in capsys.readouterr().err
    assert "model" not in launched


@pytest.mark.parametrize("args", [
    ["--proxy-url", "http://p:8000"], ["--allow-terminate-by-client"], ["--adapters", "a=/p"],
    ["--nnodes", "2"], ["--node-rank", "1"], ["--dist-init-addr", "h:1"], ["--cp", "2"],
    ["--rope-scaling-factor", "2.0"], ["--role", "Prefill"], ["--kv-transfer-config", "{}"],
    ["--hf-overrides", '{"a": 1}'], ["--generation-config", "/cfg"],
    ["--quant-policy", "fp8_e5m2"], ["--quant-policy", "42"], ["--dp", "2"], ["--ep", "2"],
    ["--language-model-only"], ["--empty-init"], ["--enable-microbatch"], ["--enable-eplb"],
    ["--logprobs-mode", "raw_logits"], ["--dllm-block-length", "4"], ["--model-format", "gptq"],
    ["--enable-return-routed-experts"], ["--kernel-block-size", "16"],
    ["--device", "ascend"],
])
def test_what_vlmdeploy_does_not_do_is_refused_naming_the_flag(launched, capsys, args):
    with pytest.raises(SystemExit) as exc:
        serve(*args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{args[0]}:" in err, err
    assert "model" not in launched  # refused before the model loads


@pytest.mark.parametrize("value,policy", [("int8", 8), ("8", 8), ("int4", 4), ("fp8", 16),
                                          ("fp8_e4m3", 16), ("none", 0)])
def test_quant_policy_reaches_the_engine_from_serve_and_chat(launched, monkeypatch, value,
                                                             policy):
    """LMDeploy's names and numbers for the KV cache policies it shares with vlmdeploy."""
    assert serve("--quant-policy", value) == 0
    assert launched["engine"].quant_policy == policy
    import vlmdeploy.cli.chat as chat_cli

    seen = {}
    monkeypatch.setattr("vlmdeploy.pipeline", lambda model, backend_config=None, **kw:
                        seen.update(engine=backend_config) or FakePipeline(), raising=False)
    monkeypatch.setattr(chat_cli, "chat_loop", lambda *a, **k: 0)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["chat", "/models/x", "--quant-policy", value]) == 0
    assert seen["engine"].quant_policy == policy


@pytest.mark.parametrize("args", [
    ["--trust-remote-code"], ["--max-log-len", "200"], ["--enable-abort-handling"],
    ["--vision-max-batch-size", "8"], ["--num-tokens-per-iter", "8192"], ["--async", "0"],
    ["--communicator", "native"], ["--speculative-algorithm", "eagle3"],
    ["--piecewise-cudagraph-max-tokens", "512"],
])
def test_tuning_flags_are_ignored_with_a_line_saying_why(launched, capsys, args):
    assert serve(*args) == 0
    err = capsys.readouterr().err
    assert f"vlmdeploy: {args[0]} ignored: " in err


def test_defaults_say_nothing(launched, capsys):
    assert serve("--cp", "1", "--role", "Hybrid", "--generation-config", "lmdeploy",
                 "--vision-max-batch-size", "1", "--quant-policy", "none") == 0
    assert "ignored" not in capsys.readouterr().err


def test_explicit_device_cuda_without_a_gpu_is_an_error(launched, monkeypatch, capsys):
    monkeypatch.setattr(serve_cli, "_cuda_available", lambda: False)
    with pytest.raises(SystemExit):
        serve("--device", "cuda")
    assert "--device cuda: no CUDA device" in capsys.readouterr().err
    assert serve() == 0  # no --device: the default runs on the CPU when there is no GPU
    assert launched["engine"].device_type == "cuda"


def test_chat_template_flag(launched, tmp_path, capsys):
    assert serve("--chat-template", "hf") == 0
    assert launched["options"]["chat_template_config"].model_name == "hf"
    spec = tmp_path / "template.json"
    spec.write_text(json.dumps({"user": "U:", "eoh": "\n", "assistant": "A:", "eoa": "\n",
                                "stop_words": ["\n"]}))
    assert serve("--chat-template", str(spec)) == 0
    assert launched["options"]["chat_template_config"].user == "U:"
    with pytest.raises(SystemExit):
        serve("--chat-template", "llama2")
    assert "another model family" in capsys.readouterr().err


def test_version_and_check_env(capsys, tmp_path):
    from vlmdeploy import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == __version__
    dump = tmp_path / "env" / "info.json"
    assert main(["check_env", "--dump-file", str(dump)]) == 0
    out = capsys.readouterr().out
    assert f"vlmdeploy: {__version__}" in out and "PyTorch: " in out and "transformers: " in out
    assert json.loads(dump.read_text())["vlmdeploy"] == __version__
    assert main(["check_env", "--dump-file", str(tmp_path / "x.pkl")]) == 1


# A launch script as LMDeploy's docs and users write it (LMDeploy 0.18).
LMDEPLOY_SCRIPT = """\
#!/bin/bash
MODEL=${1:-OpenGVLab/InternVL3_5-8B}
lmdeploy serve api_server $MODEL \\
    --backend turbomind \\
    --server-name 0.0.0.0 --server-port ${PORT:-23333} \\
    --tp 1 --session-len 8192 --cache-max-entry-count 0.8 --max-batch-size 128 \\
    --cache-block-seq-len 64 --enable-prefix-caching --max-prefill-token-num 8192 \\
    --chat-template hf --reasoning-parser intern-s1 --tool-call-parser qwen3 \\
    --max-concurrent-requests 256 --log-level INFO --model-name internvl \\
    --vision-max-batch-size 8 --allow-origins '*' --allow-credentials \\
    --communicator nccl --async 1 --quant-policy 0 --model-format hf --trust-remote-code
"""


def script_args(model: str, port: int) -> list[str]:
    text = LMDEPLOY_SCRIPT.replace("lmdeploy serve", "vlmdeploy serve")  # the only change
    command = text.split("\n", 2)[2].replace("\\\n", " ")
    command = command.replace("$MODEL", model).replace("${PORT:-23333}", str(port))
    argv = shlex.split(command)
    assert argv[:3] == ["vlmdeploy", "serve", "api_server"]
    return argv[1:]


def test_an_lmdeploy_launch_script_parses_and_configures_the_same(launched, capsys):
    assert main(script_args("/models/x", 8000)) == 0
    engine, config = launched["engine"], launched["config"]
    assert (engine.tp, engine.session_len, engine.max_batch_size, engine.block_size) == (
        1, 8192, 128, 64)
    assert engine.enable_prefix_caching and engine.max_prefill_token_num == 8192
    assert (config.server_port, config.max_concurrent_requests, config.model_name) == (
        8000, 256, "internvl")
    assert config.reasoning_parser == "intern-s1" and config.allow_origins == ("*",)
    err = capsys.readouterr().err
    assert "--vision-max-batch-size ignored" in err and "--trust-remote-code ignored" in err


@pytest.mark.slow
def test_the_launch_script_starts_a_real_server_on_the_embedded_model():
    from serve_helpers import free_port

    from vlmdeploy.assets import DEFAULT_MODEL_NAME

    port = free_port()
    argv = script_args(DEFAULT_MODEL_NAME, port)
    argv[argv.index("0.0.0.0")] = "127.0.0.1"
    argv[argv.index("8192", argv.index("--session-len"))] = "1024"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "vlmdeploy", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        models = httpx.get(url + "/v1/models").json()
        assert models["data"][0]["id"] == "internvl"
        answer = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "internvl", "max_tokens": 4,
            "messages": [{"role": "user", "content": "hello"}]})
        assert answer.status_code == 200, answer.text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("command", [["serve", "api_server"], ["chat"]], ids=["api_server", "chat"])
def test_help_says_which_engine_flags_are_not_implemented(command):
    """`--help` never promises what a flag does not do: an engine flag kept only so that LMDeploy's
    launch scripts parse says it is refused."""
    sub = build_parser()._subparsers._group_actions[0].choices[command[0]]
    if len(command) > 1:
        sub = sub._subparsers._group_actions[0].choices[command[1]]
    helps = {a.dest.removeprefix("engine."): a.help for a in sub._actions
             if a.dest.startswith("engine.")}
    unimplemented = PytorchEngineConfig._UNIMPLEMENTED
    shown = [name for name in unimplemented if name in helps]
    assert "language_model_only" in shown
    for name in shown:
        assert "not implemented here" in helps[name], (name, helps[name])
    for name, text in helps.items():
        if name not in unimplemented and text:
            assert "not implemented" not in text, name
