"""``python -m probvq`` runs the command-line interface."""

import sys

from probvq.cli import main

sys.exit(main())
