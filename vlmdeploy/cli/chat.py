"""`vlmdeploy chat [MODEL]`: a multi-turn terminal chat that streams the answer as it is generated.

Lines are read from stdin (a terminal or a pipe). Commands: `/image PATH` attaches an image (a local
file or a URL) to the next message, `/reset` starts a new conversation, `/exit` quits. The chat runs
on the user's own files, so local image paths are allowed here (the HTTP server refuses them unless
an operator opts in).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Iterable
from typing import Any, TextIO

from vlmdeploy.cli.flags import add_dataclass_flags, build
from vlmdeploy.cli.serve import add_engine_flags, configure_logging, engine_config, resolve_model
from vlmdeploy.errors import InvalidRequestError
from vlmdeploy.messages import GenerationConfig

GEN_FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k",
              "repetition_penalty")
HELP = "commands: /image PATH (attach an image), /reset (new conversation), /exit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
                        help="local checkpoint directory (default: the embedded default model)")
    parser.add_argument("--log-level", default="WARNING", type=str.upper,
                        choices=["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"],
                        help="log level (default: WARNING)")
    group = parser.add_argument_group("generation arguments")
    add_dataclass_flags(group, GenerationConfig, "gen.", GEN_FIELDS)
    add_engine_flags(parser)


class ChatSession:
    """A conversation with one pipeline: the message history and the images waiting to be sent."""

    def __init__(self, pipe: Any, gen_config: GenerationConfig, out: TextIO, err: TextIO):
        self.pipe, self.gen_config, self.out, self.err = pipe, gen_config, out, err
        self.messages: list[dict[str, Any]] = []
        self.images: list[str] = []
        self._session_ids = iter(range(1, 1 << 62))

    def command(self, line: str) -> bool:
        """Handle a `/command`; returns False on /exit."""
        name, _, arg = line.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.messages, self.images = [], []
            print("(new conversation)", file=self.err)
        elif name == "/image" and arg.strip():
            self.attach(arg.strip())
        else:
            print(HELP, file=self.err)
        return True

    def attach(self, source: str) -> None:
        is_url = source.startswith(("http://", "https://", "data:"))
        if not is_url and not os.path.isfile(os.path.expanduser(source)):
            print(f"(no such file: {source})", file=self.err)
            return
        self.images.append(source if is_url else os.path.abspath(os.path.expanduser(source)))
        print(f"(image attached: {len(self.images)} pending)", file=self.err)

    async def ask(self, text: str) -> None:
        parts = [{"type": "image_url", "image_url": {"url": u}} for u in self.images]
        content: Any = [*parts, {"type": "text", "text": text}] if parts else text
        turn = [*self.messages, {"role": "user", "content": content}]
        try:
            prepared = await self.pipe.prepare(turn, self.gen_config)
        except InvalidRequestError as exc:
            print(f"error: {exc.message}", file=self.err)
            return
        answer = []
        async for out in self.pipe.generate_prepared(prepared, next(self._session_ids)):
            answer.append(out.text)
            self.out.write(out.text)
            self.out.flush()
        self.out.write("\n")
        self.out.flush()
        self.messages = [*turn, {"role": "assistant", "content": "".join(answer)}]
        self.images = []


def chat_loop(session: ChatSession, lines: Iterable[str], interactive: bool = False) -> int:
    """Run the chat over `lines` (stdin); returns the exit code."""
    if interactive:
        print(HELP, file=session.err)
    with asyncio.Runner() as runner:
        for raw in lines:
            line = raw.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not session.command(line):
                    break
                continue
            runner.run(session.ask(line))
    return 0


def _prompted(stream: TextIO, err: TextIO) -> Iterable[str]:
    while True:
        print("> ", end="", file=err, flush=True)
        line = stream.readline()
        if not line:
            return
        yield line


def run(args: argparse.Namespace) -> int:
    import sys

    parser: argparse.ArgumentParser = args.parser
    engine = engine_config(args, parser)
    try:
        gen = build(GenerationConfig, args, "gen.")
    except (ValueError, NotImplementedError) as exc:
        parser.error(str(exc))
    model = resolve_model(args.model_path, parser)
    configure_logging(args.log_level)
    from vlmdeploy import pipeline

    try:
        pipe = pipeline(model, backend_config=engine, log_level=args.log_level)
    except Exception as exc:
        print(f"vlmdeploy: cannot load the model: {exc}", file=sys.stderr)
        return 1
    interactive = sys.stdin.isatty()
    lines = _prompted(sys.stdin, sys.stderr) if interactive else sys.stdin
    try:
        return chat_loop(ChatSession(pipe, gen, sys.stdout, sys.stderr), lines, interactive)
    finally:
        pipe.close()
