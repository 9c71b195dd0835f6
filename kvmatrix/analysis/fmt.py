"""Number, CI and table formatting for every write-up (report.md, the prefix write-up, findings).

Standard library only (``tabulate`` is imported by ``table`` when it is called), so the prefix
write-up keeps running on a host without the analysis extra. A summary argument is anything with
``median`` and ``ci`` (``kvmatrix.analysis.stats.Summary``).
"""

from __future__ import annotations

import csv
import io
import math
import textwrap

NA = "—"  # report.md: not measured / not reported
NOT_AVAILABLE = "n/a"  # the prefix write-up's and the figures' word for it


def na(v) -> str:
    """``str(v)``, or — for None."""
    return NA if v is None else str(v)


def unknown(v) -> str:
    """``str(v)``, or ? for None (configs such as ``512/?``)."""
    return "?" if v is None else str(v)


def finite(v) -> float | None:
    """v when it is a finite number, else None."""
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def ms(v: float | None, digits: int = 1) -> str:
    """A value with ``digits`` decimals, never "-0.0"; — for None."""
    if v is None:
        return NA
    return f"{0.0 if round(v, digits) == 0 else v:.{digits}f}"


def fixed(v: float | None, digits: int = 2) -> str:
    """A value with ``digits`` decimals as Python prints it; — for None."""
    return NA if v is None else f"{v:.{digits}f}"


def val_ci(v: float | None, ci: tuple[float, float] | None, digits: int = 1, sign: bool = False) -> str:
    """``12.34 [11.02, 13.90]`` (``sign``: ``+0.08 [-0.89, +0.60]``); the CI left out when there is none."""
    if v is None:
        return NA
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f.format(v) + ("" if ci is None else f" [{f.format(ci[0])}, {f.format(ci[1])}]")


def ci_text(s, digits: int = 1, sign: bool = False) -> str:
    """A summary's median with its CI (``val_ci``); — when there is no summary or no median."""
    return NA if s is None else val_ci(s.median, s.ci, digits, sign)


def med_ci(s, digits: int = 1) -> str:
    """"median [lo, hi]" of a summary; the median alone (as ``ms``) without a CI."""
    if s.median is not None and s.ci is None:
        return ms(s.median, digits)
    return val_ci(s.median, s.ci, digits)


def fmt_p(p: float | None) -> str:
    """p-value for a table: 3 significant digits, '< 1e-6' below that."""
    if p is None:
        return "—"
    if p < 1e-6:
        return "< 1e-6"
    if p < 0.001:
        return f"{p:.2e}"
    return f"{p:.3f}"


def p_text(c) -> str:
    """A comparison's Mann-Whitney p (``stats.Comparison``), "(exact)" when the exact null distribution was used."""
    return fmt_p(c.p) + (" (exact)" if c.test and c.test.method == "exact" else "")


def pct(v: float | None) -> str:
    """A fraction as a percentage, one decimal."""
    return NA if v is None else f"{v * 100:.1f}"


def signed_pct(v: float | None) -> str:
    """A change in % for a figure label: ``+12%``; n/a for None."""
    return NOT_AVAILABLE if v is None else f"{v:+.0f}%"


def pair(a: float | None, b: float | None) -> str:
    """"a / b", one decimal each (hit / miss medians)."""
    return NA if a is None and b is None else f"{ms(a)} / {ms(b)}"


def num(v: float | None, sig: int = 3) -> str:
    """``sig`` significant digits without exponent notation (1,660; 8.52; 0.0533)."""
    if v is None:
        return NA
    if v == 0:
        return "0"
    digits = max(0, sig - 1 - math.floor(math.log10(abs(v))))
    return f"{round(v, digits):,.{digits}f}"


def params_text(p: float) -> str:
    """A parameter count: 1.1 B, 124 M, 4.26 M."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if p >= div:
            return f"{p / div:.3g} {unit}"
    return f"{p:.0f}"


def ratio_text(v: float | None) -> str:
    return NA if v is None else f"{v:.1f}×"


def yes_no(v: bool | None) -> str:
    return NA if v is None else ("yes" if v else "no")


def setting(v) -> str:
    """A setting's value in a table: booleans lower case, — for None."""
    if v is None:
        return NA
    return str(v).lower() if isinstance(v, bool) else str(v)


def span(r: tuple[float, float] | None) -> str:
    """A (min, max) range as ``1400–1980``."""
    return NA if r is None else f"{r[0]:.0f}–{r[1]:.0f}"


def shorten(text, width: int) -> str | None:
    """Text cut to ``width`` characters with an ellipsis; None stays None."""
    if text is None or text == "":
        return None
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def wrap(name: str, width: int) -> str:
    """Wrap a label at spaces and after slashes, never inside a word."""
    text = textwrap.fill(name.replace("/", "/ "), width, break_long_words=False, break_on_hyphens=False)
    return text.replace("/ ", "/")


# ---------------------------------------------------------------- tables


def table(rows: list[list] | list[dict], headers="keys") -> str:
    """A padded GitHub table (tabulate), — for missing values, numbers left as given (report.md)."""
    from tabulate import tabulate  # noqa: PLC0415 - only report.md needs it

    return tabulate(rows, headers=headers, tablefmt="github", missingval=NA, disable_numparse=True)


def value(v, digits: int = 4) -> str:
    """A cell of a compact table: floats with ``digits`` decimals, n/a for None and non-finite values."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return NOT_AVAILABLE
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def md_table(header, rows: list[list]) -> str:
    """A compact markdown table (``| a | b |`` lines, no padding); cells through ``value``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(value(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def to_csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    """CSV text of ``rows`` (missing and None values empty), the columns in the given order."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue()


def json_safe(d: dict) -> dict:
    """NaN / inf -> None, so the JSON is standard."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
