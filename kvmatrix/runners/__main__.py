"""``python -m kvmatrix.runners CELL.json``: run one cell (see run_cell.py)."""

import sys

from kvmatrix.runners.run_cell import main

sys.exit(main())
