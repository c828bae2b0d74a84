"""Server settings: one frozen dataclass whose fields are also the CLI flags of `serve api_server`.

The CLI generates `--kebab-case` flags from these fields (see `vlmdeploy.cli.flags`), so a setting
is declared once, here. `field(metadata={"help": ...})` carries the flag's help text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from vlmdeploy.serve.reasoning import REASONING_PARSERS
from vlmdeploy.serve.tool_parsers import TOOL_PARSERS, check_tool_parser

LogLevel = Literal["CRITICAL", "FATAL", "ERROR", "WARN", "WARNING", "INFO", "DEBUG", "NOTSET"]


def _flag(default: object, help: str) -> Any:
    return field(default=default, metadata={"help": help})


_PARSERS = ", ".join(REASONING_PARSERS)
_TOOL_PARSERS = ", ".join(TOOL_PARSERS)


@dataclass(frozen=True)
class ServerConfig:
    """Everything the HTTP front end needs that is not the model itself."""

    server_name: str = _flag("0.0.0.0", "host to bind")
    server_port: int = _flag(23333, "port to bind")
    backend: Literal["pytorch", "turbomind"] = _flag(
        "pytorch", "inference backend; turbomind is accepted and runs the PyTorch engine")
    model_name: str | None = _flag(None, "served model name (default: the model directory's name)")
    api_keys: tuple[str, ...] | None = field(default=None, metadata={
        "nargs": "*", "help": "accepted bearer keys, space separated; required on all routes but "
        "/health and /metrics (see --protect-metrics)"})
    allow_origins: tuple[str, ...] | None = _flag(None, "CORS allowed origins (default: CORS off)")
    allow_credentials: bool = _flag(False, "CORS: allow credentials")
    allow_methods: tuple[str, ...] = _flag(("GET", "POST"), "CORS: allowed methods")
    allow_headers: tuple[str, ...] = _flag(("*",), "CORS: allowed headers")
    max_concurrent_requests: int | None = _flag(
        1024, "generation requests in flight; more wait for a slot, in arrival order, as with "
        "LMDeploy (default: %(default)s)")
    max_queued_requests: int = _flag(
        4096, "requests waiting for a slot; beyond, 429 rate_limit_exceeded (default: "
        "%(default)s)")
    ssl: bool = _flag(False, "serve HTTPS with the key and certificate files named by the "
                      "SSL_KEYFILE and SSL_CERTFILE environment variables (as LMDeploy)")
    disable_fastapi_docs: bool = _flag(False, "serve no /docs and no /openapi.json")
    disable_metrics: bool = _flag(False, "serve no /metrics")
    protect_metrics: bool = _flag(
        False, "require the --api-keys on /metrics too (default: /metrics is open, as vLLM's, "
        "and holds only counts and timings)")
    allowed_media_domains: tuple[str, ...] | None = _flag(
        None, "fetch image URLs only from these domains (default: any public host)")
    allowed_local_media_path: str | None = _flag(
        None, "directory from which local image paths may be read (default: none)")
    max_images_per_request: int = _flag(
        32, "images one request may carry (400 beyond, before any image is fetched)")
    video_num_frames: int = _flag(
        8, "frames sampled from a video that names no num_frames (the model card's example "
        "uses 8; each frame is one 448 tile: 256 tokens)")
    max_video_frames: int = _flag(
        64, "most frames a request may ask of one video (400 beyond)")
    reasoning_parser: str | None = _flag(
        None, f"split <think>...</think> into reasoning_content; one of: {_PARSERS}")
    tool_call_parser: str | None = _flag(
        None, f"parse tool calls out of answers to requests with tools; one of: {_TOOL_PARSERS} "
        "(qwen3 for InternVL3.5, gpt-oss for its GPT-OSS model)")
    log_level: LogLevel = _flag("WARNING", "log level")
    max_body_bytes: int = _flag(64 << 20, "largest request body accepted, in bytes (413 beyond)")
    max_prompt_chars: int | None = _flag(
        None, "largest prompt text accepted, in characters, checked before templating and "
        "tokenising (400 context_length_exceeded beyond; default: 16 x session_len)")
    header_timeout_s: float = _flag(10.0, "seconds a client has to send a request's headers")
    body_timeout_s: float = _flag(60.0, "seconds a client has to send a request's body")
    max_connections: int = _flag(
        4096, "open connections at once; more are answered 503 and closed (0: no cap)")
    max_connections_per_client: int = _flag(
        512, "open connections from one client address; more are answered 429 and closed "
        "(0: no cap; behind a reverse proxy every connection comes from the proxy's address)")
    shutdown_timeout: float = _flag(
        30.0, "seconds in-flight requests may take to finish after SIGTERM/SIGINT; then each ends "
        "with a 503 error (a stream: an error event and [DONE])")

    def __post_init__(self) -> None:
        if not 0 < self.server_port < 65536:
            raise ValueError("server_port must be in 1..65535")
        if self.max_concurrent_requests is not None and self.max_concurrent_requests < 1:
            raise ValueError("max_concurrent_requests must be >= 1")
        if self.max_queued_requests < 0:
            raise ValueError("max_queued_requests must be >= 0")
        if self.protect_metrics and not self.api_keys:
            raise ValueError("--protect-metrics needs --api-keys")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {self.reasoning_parser!r}; "
                             f"choose from {', '.join(REASONING_PARSERS)}")
        check_tool_parser(self.tool_call_parser)
        if self.max_images_per_request < 0:
            raise ValueError("max_images_per_request must be >= 0")
        if not 1 <= self.video_num_frames <= self.max_video_frames:
            raise ValueError("need 1 <= video_num_frames <= max_video_frames")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be >= 1024")
        if self.header_timeout_s <= 0 or self.body_timeout_s <= 0:
            raise ValueError("timeouts must be > 0")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError("max_prompt_chars must be >= 1")
        if self.max_connections < 0 or self.max_connections_per_client < 0:
            raise ValueError("max_connections and max_connections_per_client must be >= 0")
        if self.shutdown_timeout < 0:
            raise ValueError("shutdown_timeout must be >= 0")
        if self.api_keys is not None and any(not k for k in self.api_keys):
            raise ValueError("api keys must be non-empty")
