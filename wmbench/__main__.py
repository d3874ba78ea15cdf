"""``python -m wmbench``: the command line, for an environment without the console script."""

import sys

from wmbench.cli import main

sys.exit(main())
