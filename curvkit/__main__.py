"""``python -m curvkit`` (and ``torchrun ... -m curvkit train CONFIG``): the command line."""

import sys

from curvkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
