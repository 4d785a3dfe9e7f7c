"""`python -m foldformer.cli` (as torchrun runs it): the `foldformer` command."""

import sys

from foldformer.cli import console

sys.exit(console())
