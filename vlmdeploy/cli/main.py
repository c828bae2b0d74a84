"""The `vlmdeploy` command: `vlmdeploy serve api_server [MODEL]` and `vlmdeploy chat [MODEL]`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from vlmdeploy.cli import chat, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmdeploy",
                                     description="Deploy InternVL3.5 vision-language models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve_parser = commands.add_parser("serve", help="serve a model over HTTP")
    servers = serve_parser.add_subparsers(dest="server", required=True, metavar="SERVER")
    api = servers.add_parser("api_server", help="OpenAI-compatible HTTP server")
    serve.add_arguments(api)
    api.set_defaults(func=serve.run, parser=api)

    chat_parser = commands.add_parser("chat", help="chat with a model in the terminal")
    chat.add_arguments(chat_parser)
    chat_parser.set_defaults(func=chat.run, parser=chat_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
