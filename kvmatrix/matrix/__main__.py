"""``python -m kvmatrix.matrix ...`` (see cli.py)."""

from kvmatrix.matrix.cli import main
from kvmatrix.plumbing.console import run_main

run_main(main)
