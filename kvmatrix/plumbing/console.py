"""Host-side messages: progress lines and the one-line fatal error.

Bad input ends with ONE line on stderr that names the problem and the fix,
and a non-zero exit. ``UserError`` carries that line; the entry points catch
it, print it, and exit 2. Nothing already written is touched on the way out.
"""

from __future__ import annotations

import signal
import sys
import time

_T0 = time.monotonic()


class UserError(Exception):
    """A problem the user can fix; str(e) is the one-line message."""


def fail(message: str) -> None:
    raise UserError(message)


def say(message: str) -> None:
    elapsed = time.monotonic() - _T0
    print(f"[kvmatrix {elapsed:7.1f}s] {message}", file=sys.stderr, flush=True)


def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _term_when_parent_dies() -> None:
    """Ask Linux for a SIGTERM when the parent (nox, a shell) dies, so a killed nox still cleans up."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes  # noqa: PLC0415

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_main(main) -> None:
    """Call main(); turn UserError into one line and exit code 2.

    SIGTERM is handled like Ctrl-C (SIGINT): the cleanup on the way out (engines stopped, containers of
    the run removed, the interrupted cell recorded as failed) runs for both; exit code 130. The
    parent's death (nox killed with SIGTERM does not pass it on) is delivered as SIGTERM too.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    _term_when_parent_dies()
    try:
        code = main()
    except UserError as exc:
        print(f"kvmatrix: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("kvmatrix: interrupted; completed cells are kept, rerun with --resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
