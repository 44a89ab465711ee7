"""`python -m lmtune`: the same as the `lmtune` command (where lmtune is on the path but not installed)."""

import sys

from lmtune.cli import main

sys.exit(main())
