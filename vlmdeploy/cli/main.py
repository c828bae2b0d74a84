"""The `vlmdeploy` command: `vlmdeploy serve api_server [MODEL]`, `vlmdeploy chat [MODEL]`,
`vlmdeploy check_env` and `vlmdeploy --version`, as LMDeploy's `lmdeploy` command has them.

Ctrl-C ends any of them without a traceback (exit status 130 when it interrupts start-up)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vlmdeploy import __version__
from vlmdeploy.cli import chat, check_env, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmdeploy",
                                     description="Deploy InternVL3.5 vision-language models.")
    parser.add_argument("-v", "--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve_parser = commands.add_parser("serve", help="serve a model over HTTP")
    servers = serve_parser.add_subparsers(dest="server", required=True, metavar="SERVER")
    api = servers.add_parser("api_server", help="OpenAI-compatible HTTP server")
    serve.add_arguments(api)
    api.set_defaults(func=serve.run, parser=api)

    chat_parser = commands.add_parser("chat", help="chat with a model in the terminal")
    chat.add_arguments(chat_parser)
    chat_parser.set_defaults(func=chat.run, parser=chat_parser)

    env_parser = commands.add_parser("check_env", help="print the environment (for bug reports)")
    check_env.add_arguments(env_parser)
    env_parser.set_defaults(func=check_env.run, parser=env_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: a clean exit, no traceback
        print(file=sys.stderr)
        return 130
