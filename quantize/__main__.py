"""python -m quantize: the maintainer command, quantize/maintainer/cli.py."""

import sys

from quantize.maintainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
