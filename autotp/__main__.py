"""``python -m autotp`` (and ``torchrun ... -m autotp``) runs the command line."""

from autotp.cli import entry_point

entry_point()
