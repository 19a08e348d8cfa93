"""``python -m rnnkit`` runs the CLI."""

import sys

from rnnkit.cli import main

sys.exit(main())
