"""``python -m fullsparse.bench layers|steps|gpu ...``: the same as ``fullsparse bench``."""

import sys

from fullsparse.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
