"""python -m quantize.bench: the benchmark's command name; the benchmark is quantize/tools/bench.py."""

import sys

from quantize.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
