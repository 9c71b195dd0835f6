"""``python -m kvmatrix.runners CELL.json [CELL.json ...]``: run cells on one engine (see run_cell.py)."""

import sys

from kvmatrix.runners.run_cell import main

sys.exit(main())
