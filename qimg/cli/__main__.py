"""`python -m qimg.cli ...`: the same as the `qimg` command."""

import sys

from qimg.cli import main

sys.exit(main())
