"""``python -m mrharmony`` runs the CLI."""

import sys

from mrharmony.cli import main

sys.exit(main())
