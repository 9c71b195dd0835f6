"""python -m kvmatrix.models --model tiny --llama-source DIR [--llama-commit C]"""

from kvmatrix.matrix.console import run_main
from kvmatrix.models.store import main

run_main(main)
