"""LMDeploy 0.18's flags of `serve api_server` and `chat` that vlmdeploy has no setting of its own
for, so that a launch script written for LMDeploy runs with only the command name changed.

Most of LMDeploy's flags are vlmdeploy's own, generated from `ServerConfig` and
`PytorchEngineConfig` (`vlmdeploy.cli.serve`). The others are declared here, each with what it
means here:

* `warn`: accepted; the flag only tunes something vlmdeploy does its own way, or asks for what
  vlmdeploy always does. A non-default value prints one line naming the flag and why, and the
  command runs.
* `error`: the flag asks for something vlmdeploy does not do (multi-node serving, LoRA adapters,
  TurboMind-only model changes, ...). A non-default value stops the command with a message naming
  the flag and why; the default value is accepted silently.

`tests/cli/test_lmdeploy_compat.py` checks that every flag of LMDeploy 0.18's two commands parses.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

_TURBOMIND = "a TurboMind engine option; vlmdeploy runs its own PyTorch engine"


@dataclass(frozen=True)
class Foreign:
    flag: str
    verdict: Literal["warn", "error"]
    why: str
    spec: dict[str, Any] = field(default_factory=dict)  # argparse keywords
    accepts: Callable[[Any], bool] | None = None  # values taken without a message

    @property
    def dest(self) -> str:
        return "lmdeploy." + self.flag.lstrip("-").replace("-", "_")

    def silent(self, value: Any) -> bool:
        if self.accepts is not None:
            return self.accepts(value)
        return value == self.spec.get("default")


def _flag(flag: str, verdict: Literal["warn", "error"], why: str, accepts: Any = None,
          **spec: Any) -> Foreign:
    if spec.get("action") == "store_true":
        spec.setdefault("default", False)
    else:
        spec.setdefault("default", None)
    return Foreign(flag, verdict, why, spec, accepts)


TRUST_REMOTE_CODE = _flag(
    "--trust-remote-code", "warn", "vlmdeploy never runs code shipped with a checkpoint; "
    "InternVL3.5 needs none", action="store_true")
ADAPTERS = _flag("--adapters", "error", "LoRA adapters are not supported by vlmdeploy",
                 nargs="*", type=str)
SPECULATIVE = [
    _flag("--speculative-algorithm", "warn", "speculative decoding is not implemented in "
          "vlmdeploy; tokens are decoded one step at a time (the same answers)", type=str),
    _flag("--speculative-draft-model", "warn", "speculative decoding is not implemented", type=str),
    _flag("--speculative-num-draft-tokens", "warn", "speculative decoding is not implemented",
          type=int, default=1),
    _flag("--speculative-dflash-block-size", "warn", "speculative decoding is not implemented",
          type=int),
]
TURBOMIND_TUNING = [
    _flag("--num-tokens-per-iter", "warn", _TURBOMIND, type=int, default=0),
    _flag("--max-prefill-iters", "warn", _TURBOMIND, type=int, default=1),
    _flag("--async", "warn", _TURBOMIND, type=int, default=1, choices=[0, 1]),
    _flag("--communicator", "warn", _TURBOMIND, type=str, default="nccl",
          choices=["nccl", "native", "cuda-ipc"]),
    _flag("--moe-a2a-backend", "warn", _TURBOMIND, type=str, default="auto",
          choices=["auto", "default", "deepep"]),
]
TURBOMIND_MODEL = [
    _flag("--cp", "error", "context parallelism is a TurboMind engine option; vlmdeploy has none",
          type=int, default=1),
    _flag("--rope-scaling-factor", "error", "a TurboMind engine option that changes the model's "
          "positions; vlmdeploy takes rope scaling from the checkpoint's config.json",
          type=float, default=0.0),
]

CHAT = [
    _flag("--backend", "warn", "vlmdeploy has one engine; the PyTorch engine runs", type=str,
          default="pytorch", choices=["pytorch", "turbomind"],
          accepts=lambda v: v == "pytorch"),
    TRUST_REMOTE_CODE, ADAPTERS, *TURBOMIND_TUNING[2:], *TURBOMIND_MODEL, *SPECULATIVE,
]

API_SERVER = [
    _flag("--proxy-url", "error", "registering with LMDeploy's proxy server is not supported; "
          "put any load balancer in front of vlmdeploy servers", type=str),
    _flag("--allow-terminate-by-client", "error", "vlmdeploy lets no client stop the server; "
          "send SIGTERM (requests in flight drain first)", action="store_true"),
    _flag("--enable-abort-handling", "warn", "vlmdeploy aborts a request as soon as its client "
          "disconnects; it has no abort route", action="store_true"),
    TRUST_REMOTE_CODE,
    _flag("--max-log-len", "warn", "vlmdeploy never logs prompts, so there is nothing to "
          "shorten", type=int),
    _flag("--generation-config", "error", "only 'auto' and 'lmdeploy' are supported: requests' "
          "sampling defaults are OpenAI's", type=str, default="auto",
          accepts=lambda v: v in ("auto", "lmdeploy")),
    ADAPTERS,
    _flag("--hf-overrides", "error", "overriding the checkpoint's config.json is not supported",
          type=json.loads),
    _flag("--role", "error", "prefill/decode disaggregation is not supported; vlmdeploy runs "
          "Hybrid engines", type=str, default="Hybrid", choices=["Hybrid", "Prefill", "Decode"]),
    _flag("--migration-backend", "warn", "only used by disaggregated serving, which vlmdeploy "
          "does not do", type=str, default="DLSlime", choices=["DLSlime", "Mooncake"]),
    _flag("--piecewise-cudagraph-max-tokens", "warn", "vlmdeploy captures prefill CUDA graphs "
          "of up to 1,024 tokens on its own", type=int),
    _flag("--node-rank", "error", "multi-node serving is not supported", type=int, default=0),
    _flag("--nnodes", "error", "multi-node serving is not supported", type=int, default=1),
    _flag("--dist-init-addr", "error", "multi-node serving is not supported", type=str),
    *TURBOMIND_MODEL, *TURBOMIND_TUNING,
    _flag("--vision-max-batch-size", "warn", "vlmdeploy's vision stage batches the tiles of all "
          "waiting requests, up to 64 a call, on its own", type=int, default=1),
    *SPECULATIVE,
    _flag("--kv-transfer-config", "error", "KV-cache transfer connectors (disaggregated serving) "
          "are not supported", type=json.loads),
]

QUANT_POLICIES = {"none": 0, "int4": 4, "int8": 8, "fp8": 16, "fp8_e4m3": 16, "fp8_e5m2": 17,
                  "turbo_quant": 42}


def quant_policy(text: str) -> int:
    """LMDeploy's `--quant-policy`: a number or a name (`int8`, `fp8`, ...)."""
    key = text.lower()
    if key in QUANT_POLICIES:
        return QUANT_POLICIES[key]
    value = int(text)
    if value not in QUANT_POLICIES.values():
        raise argparse.ArgumentTypeError(f"invalid quant_policy: {text!r}")
    return value


def add_foreign_flags(parser: argparse.ArgumentParser, flags: list[Foreign]) -> None:
    group = parser.add_argument_group(
        "LMDeploy arguments", "accepted so that LMDeploy launch scripts run; see `vlmdeploy.cli."
        "lmdeploy_flags` for what each means here")
    for flag in flags:
        if flag.flag in parser._option_string_actions:  # vlmdeploy has it
            continue
        help_text = f"{flag.why} ({'ignored' if flag.verdict == 'warn' else 'refused'})"
        group.add_argument(flag.flag, dest=flag.dest, help=help_text, **flag.spec)


def check_foreign_flags(args: argparse.Namespace, parser: argparse.ArgumentParser,
                        flags: list[Foreign]) -> None:
    """A message for each foreign flag given a value of consequence; `error`s stop the command."""
    for flag in flags:
        if not hasattr(args, flag.dest):
            continue
        value = getattr(args, flag.dest)
        if flag.silent(value):
            continue
        if flag.verdict == "error":
            parser.error(f"{flag.flag}: {flag.why}")
        print(f"vlmdeploy: {flag.flag} ignored: {flag.why}", file=sys.stderr)
