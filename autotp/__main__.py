"""``python -m autotp`` (and ``torchrun ... -m autotp``) runs the command line."""

import sys

from autotp.cli import main

sys.exit(main())
