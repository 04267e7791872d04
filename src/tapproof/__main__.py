"""``python -m tapproof`` runs the CLI."""

import sys

from tapproof.cli.main import main

sys.exit(main())
