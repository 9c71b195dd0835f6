"""argparse answering bad input as kvmatrix does everywhere: ONE line ``kvmatrix: error: ...``, exit 2.

Stdlib only and in no layer, so every entry point uses it: the host CLI (``kvmatrix.matrix``) and the
analysis modules' ``python -m`` entries (which must not import the host side).
"""

from __future__ import annotations

import argparse
import re
import sys


def usage_message(message: str, prog: str) -> str:
    """argparse's usage error as kvmatrix's one line (without the ``kvmatrix: error:`` prefix)."""
    m = re.fullmatch(r"argument (\S+): invalid (int|float) value: '(.*)'", message)
    if m:
        option, kind, value = m.groups()
        message = (f"{option} {value!r}: not a {'whole number' if kind == 'int' else 'number'}; "
                   f"give {'an integer' if kind == 'int' else 'a number'}")
    else:
        message = message.removeprefix("argument ")
    return f"{message} (see `{prog} --help`)"


class ArgumentParser(argparse.ArgumentParser):
    """Usage errors as the one kvmatrix line and exit 2, not argparse's usage dump.

    Subparsers made by ``add_subparsers`` are of this class too, so every subcommand answers the same way.
    """

    def error(self, message: str):
        print(f"kvmatrix: error: {usage_message(message, self.prog)}", file=sys.stderr)
        sys.exit(2)
