"""`python -m vlmdeploy ...` runs the `vlmdeploy` command."""

import sys

from vlmdeploy.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
