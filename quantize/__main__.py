"""python -m quantize: the maintainer command, quantize/build/cli.py."""

import sys

from quantize.build.cli import main

if __name__ == "__main__":
    sys.exit(main())
