"""`vlmdeploy chat [MODEL]`: a multi-turn terminal chat that streams the answer as it is generated.

In a terminal, input works as in LMDeploy's `chat`: a message may span several lines and is sent
by an empty line; `exit` quits and `end` starts a new conversation; Ctrl-C at the prompt quits and
Ctrl-C during an answer stops that answer (the turn is dropped). Piped stdin sends one message per
line. Commands: `/image PATH` attaches an image (a local file or a URL) to the next message,
`/video PATH [FRAMES]` a video (FRAMES frames sampled as the model card does; 8 unless given),
`/reset` starts a new conversation, `/exit` quits. The chat runs on the user's own files, so local
image and video paths are allowed here (the HTTP server refuses them unless an operator opts in).

Every flag of LMDeploy 0.18's `chat` is accepted (`vlmdeploy.cli.lmdeploy_flags`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Iterable
from typing import Any, TextIO

from vlmdeploy.cli.flags import add_dataclass_flags, build
from vlmdeploy.cli.lmdeploy_flags import CHAT, add_foreign_flags, check_foreign_flags
from vlmdeploy.cli.serve import (
    add_common_arguments,
    add_engine_flags,
    chat_template_config,
    configure_logging,
    engine_config,
    resolve_model,
)
from vlmdeploy.errors import InvalidRequestError
from vlmdeploy.messages import GenerationConfig
from vlmdeploy.vl.media_policy import VideoLimits

GEN_FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k",
              "repetition_penalty")
HELP = ("commands: /image PATH (attach an image), /video PATH [FRAMES] (attach a video, "
        f"{VideoLimits.default_frames} frames unless given), /reset (new conversation), /exit")
ATTACH = ("/image ", "/video ")  # the commands a terminal block may hold beside its text
TERMINAL_HELP = ("a message may span lines; an empty line sends it. exit: quit, end: new "
                 "conversation, Ctrl-C: stop the answer. " + HELP)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--log-level", default="WARNING", type=str.upper,
                        choices=["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"],
                        help="log level (default: WARNING)")
    group = parser.add_argument_group("generation arguments")
    add_dataclass_flags(group, GenerationConfig, "gen.", GEN_FIELDS)
    add_engine_flags(parser)
    add_foreign_flags(parser, CHAT)


class ChatSession:
    """A conversation with one pipeline: the message history and the images and videos waiting
    to be sent (content parts, in the order they were attached)."""

    def __init__(self, pipe: Any, gen_config: GenerationConfig, out: TextIO, err: TextIO):
        self.pipe, self.gen_config, self.out, self.err = pipe, gen_config, out, err
        self.messages: list[dict[str, Any]] = []
        self.attached: list[dict[str, Any]] = []
        self._session_ids = iter(range(1, 1 << 62))

    def command(self, line: str) -> bool:
        """Handle a `/command`; returns False on /exit."""
        name, _, arg = line.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.messages, self.attached = [], []
            print("(new conversation)", file=self.err)
        elif name == "/image" and arg.strip():
            self.attach(arg.strip())
        elif name == "/video" and arg.strip():
            self.attach_video(arg.strip())
        else:
            print(HELP, file=self.err)
        return True

    def attach(self, source: str) -> None:
        url = self._source(source)
        if url is not None:
            self.attached.append({"type": "image_url", "image_url": {"url": url}})
            print(f"(image attached: {len(self.attached)} pending)", file=self.err)

    def attach_video(self, arg: str) -> None:
        """`/video PATH [FRAMES]`: a last word of digits is the frame count (a path may hold
        spaces); without it the pipeline's default applies."""
        source, _, count = arg.rpartition(" ")
        if not (source.strip() and count.isdigit()):
            source, count = arg, ""
        limit = VideoLimits.max_frames
        if count and not 1 <= int(count) <= limit:  # refused here, or every turn would fail
            print(f"(frames must be from 1 to {limit})", file=self.err)
            return
        url = self._source(source.strip())
        if url is not None:
            spec: dict[str, Any] = {"url": url}
            if count:
                spec["num_frames"] = int(count)
            self.attached.append({"type": "video_url", "video_url": spec})
            print(f"(video attached: {len(self.attached)} pending)", file=self.err)

    def _source(self, source: str) -> str | None:
        """A URL as given, else a local file's absolute path; None (and said so) when there is
        no such file."""
        if source.startswith(("http://", "https://", "data:")):
            return source
        if not os.path.isfile(os.path.expanduser(source)):
            print(f"(no such file: {source})", file=self.err)
            return None
        return os.path.abspath(os.path.expanduser(source))

    async def ask(self, text: str) -> None:
        content: Any = [*self.attached, {"type": "text", "text": text}] if self.attached else text
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
        self.attached = []


def chat_loop(session: ChatSession, messages: Iterable[str], interactive: bool = False) -> int:
    """Run the chat over `messages` (stdin's lines, or a terminal's blocks); returns the exit
    code."""
    if interactive:
        print(TERMINAL_HELP, file=session.err)
    with asyncio.Runner() as runner:
        for raw in messages:
            text = raw.strip()
            if not text:
                continue
            if text == "exit":  # LMDeploy's words
                break
            if text == "end":
                text = "/reset"
            lines = text.split("\n")
            if len(lines) > 1:  # a terminal block: its /image and /video lines attach media
                for line in (x.strip() for x in lines if x.strip().startswith(ATTACH)):
                    session.command(line)
                text = "\n".join(x for x in lines if not x.strip().startswith(ATTACH)).strip()
                if not text:
                    continue
            elif text.startswith("/"):
                if not session.command(text):
                    break
                continue
            try:
                runner.run(session.ask(text))
            except KeyboardInterrupt:  # Ctrl-C during an answer: stop it, drop the turn
                print("\n(stopped)", file=session.err)
                session.attached = []
    return 0


def _blocks(stream: TextIO, err: TextIO) -> Iterable[str]:
    """A terminal's messages, LMDeploy style: lines until an empty one (a command line alone is
    taken at once)."""
    while True:
        lines: list[str] = []
        while True:
            print("> " if not lines else ". ", end="", file=err, flush=True)
            line = stream.readline()
            if not line:  # end of input: send what is pending, then stop
                if lines:
                    yield "\n".join(lines)
                return
            line = line.rstrip("\n")
            if not lines and (line.strip().startswith("/") or line.strip() in ("exit", "end")):
                yield line
                break
            if not line.strip():
                if lines:
                    yield "\n".join(lines)
                    break
                continue
            lines.append(line)


def run(args: argparse.Namespace) -> int:
    import sys

    parser: argparse.ArgumentParser = args.parser
    check_foreign_flags(args, parser, CHAT)
    engine = engine_config(args, parser)
    template = chat_template_config(args, parser)
    try:
        gen = build(GenerationConfig, args, "gen.")
    except (ValueError, NotImplementedError) as exc:
        parser.error(str(exc))
    model = resolve_model(args.model_path, parser, engine)
    configure_logging(args.log_level)
    from vlmdeploy import pipeline

    try:
        pipe = pipeline(model, backend_config=engine, log_level=args.log_level,
                        chat_template_config=template)
    except Exception as exc:
        print(f"vlmdeploy: cannot load the model: {exc}", file=sys.stderr)
        return 1
    interactive = sys.stdin.isatty()
    lines = _blocks(sys.stdin, sys.stderr) if interactive else sys.stdin
    try:
        return chat_loop(ChatSession(pipe, gen, sys.stdout, sys.stderr), lines, interactive)
    except KeyboardInterrupt:  # Ctrl-C at the prompt: quit, as LMDeploy's chat does
        print(file=sys.stderr)
        return 0
    finally:
        pipe.close()
