"""``python -m fullsparse`` (also what ``torchrun -m fullsparse`` runs)."""

import sys

from fullsparse.cli import main

sys.exit(main())
