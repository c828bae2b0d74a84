"""Command line: `vlmdeploy serve api_server` and `vlmdeploy chat` (entry point `main.main`)."""
