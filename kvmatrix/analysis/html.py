"""report.html: the report.md text as one self-contained page (figures inline, sortable tables, no network).

ONE source of content: the page is converted from the markdown the report module writes, never built a second
way. The converter here covers the subset the write-ups use (ATX headings, paragraphs, bullet and ordered lists,
nested, pipe tables, fenced code, block quotes, ``<details>`` / ``<summary>`` lines, inline code, bold / italic,
links, images, backslash escapes); every other character is HTML-escaped, raw HTML included. Standard library only.

* An image ``figures/NAME.png`` is inlined as a data URI: the SVG beside it when there is one, else the PNG; a link
  to ``figures/NAME.png`` / ``.svg`` becomes an in-page anchor to that figure. A Content-Security-Policy allows
  data: images and the page's own inline style and script only, so the page cannot load anything from the network;
  links to web pages stay plain links.
* The first h2 section (the generated findings) is ``<section id="findings">``; the first figure ``<img>`` has
  ``id="summary-figure"``; headings get ids and the h2s a compact table of contents after the header.
* Tables sort on a header click (numbers by their first number, "18.5 [15.8, 23.5]" by 18.5, else text;
  again to reverse).

``screenshot`` / ``probe`` render the page in a headless Chromium (Debian's ``chromium``) that never outlives
the call::

    python -m kvmatrix.analysis.html DIR [--screenshot]

writes ``DIR/report.html`` from ``DIR/report.md`` (and ``DIR/report_first_screen.png``, 1280x900).
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvmatrix.cli_parser import ArgumentParser
from kvmatrix.runners.results import atomic_target, write_text_atomic

__all__ = ["ChromiumError", "chromium_binary", "main", "probe", "render_html", "screenshot", "write_html"]

HTML_NAME = "report.html"
SCREENSHOT_NAME = "report_first_screen.png"
MIME = {".svg": "image/svg+xml", ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif"}
RESERVED_IDS = ("findings", "summary-figure", "toc")

_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})\s*([^`\s]*)[^`]*$")
_HR = re.compile(r"^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_BULLET = re.compile(r"^( {0,3})([-*+])( +|$)")
_ORDERED = re.compile(r"^( {0,3})(\d{1,9})([.)])( +|$)")
_DELIM = re.compile(r"^ {0,3}\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$")
_DETAILS = re.compile(r"^ {0,3}(<details(?: open)?>|</details>|<summary>(.*)</summary>)\s*$", re.I)
_LONE_IMAGE = re.compile(r"^!\[[^\]]*\]\([^()\s]+\)$")
_FIGURE_URL = re.compile(r"^(?:\./)?figures/([^/?#]+)\.(?:png|svg)$")
_SAFE_URL = re.compile(r"^(?:https?:|mailto:|#|[^:]*$)", re.I)
_NUMBER = re.compile(r"^[<>≤≥~≈]?\s*[+\-−]?(?:\d[\d,]*\.?\d*|\.\d+)(?:e[+\-]?\d+)?", re.I)
_ESCAPABLE = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


class ChromiumError(RuntimeError):
    """No chromium binary, or it failed / timed out (the message is one line)."""


# ---------------------------------------------------------------- the converter


class _Renderer:
    def __init__(self, figures_dir: Path):
        self.figures_dir = Path(figures_dir)
        self.ids: set[str] = set(RESERVED_IDS)
        self.fig_ids: dict[str, str] = {}  # figure stem -> the id of its first inlined occurrence
        self.toc: list[tuple[str, str]] = []  # (id, heading html) of every h2

    def new_id(self, text: str) -> str:
        base = re.sub(r"[^\w\- ]", "", text.lower()).strip().replace(" ", "-")
        base = re.sub(r"-{2,}", "-", base) or "section"
        slug, n = base, 1
        while slug in self.ids:
            slug, n = f"{base}-{n}", n + 1
        self.ids.add(slug)
        return slug

    # ------------------------------------------------------------ blocks

    def blocks(self, lines: list[str]) -> tuple[list[tuple[str, str]], bool]:
        """(kind, html) of each block and whether a blank line separated two of them (a loose list item)."""
        out: list[tuple[str, str]] = []
        loose, pending_blank, details, i, n = False, False, 0, 0, len(lines)
        while i < n:
            line = lines[i]
            if not line.strip():
                pending_blank, i = bool(out), i + 1
                continue
            loose, pending_blank = loose or pending_blank, False
            if m := _FENCE.match(line):
                indent, fence, lang = len(m[1]), m[2], m[3]
                body, i = [], i + 1
                while i < n and not re.match(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[i]):
                    body.append(lines[i][min(indent, len(lines[i]) - len(lines[i].lstrip(" "))):])
                    i += 1
                i += 1
                cls = f' class="language-{html.escape(lang)}"' if lang else ""
                out.append(("pre", f"<pre><code{cls}>{html.escape(chr(10).join(body))}</code></pre>"))
            elif m := _HEADING.match(line):
                level, inner = len(m[1]), self.inline(m[2] or "")
                hid = self.new_id(html.unescape(re.sub(r"<[^>]+>", "", inner)))
                if level == 2:
                    self.toc.append((hid, inner))
                out.append((f"h{level}", f'<h{level} id="{hid}">{inner}</h{level}>'))
                i += 1
            elif _HR.match(line):
                out.append(("hr", "<hr>"))
                i += 1
            elif m := _DETAILS.match(line):
                tag = m[1].lower()
                if tag.startswith("<summary"):
                    out.append(("html", f"<summary>{self.inline(m[2])}</summary>"))
                elif tag.startswith("</"):
                    out.append(("html", "</details>") if details else ("p", f"<p>{html.escape(line.strip())}</p>"))
                    details = max(0, details - 1)
                else:
                    out.append(("html", tag))
                    details += 1
                i += 1
            elif line.lstrip().startswith(">"):
                quoted = []
                while i < n and lines[i].lstrip().startswith(">"):
                    quoted.append(re.sub(r"^\s*> ?", "", lines[i]))
                    i += 1
                inner_blocks, _ = self.blocks(quoted)
                out.append(("blockquote", "<blockquote>" + "".join(h for _, h in inner_blocks) + "</blockquote>"))
            elif self._table_start(lines, i):
                table, i = self._table(lines, i)
                out.append(("table", table))
            elif _BULLET.match(line) or _ORDERED.match(line):
                lst, i = self._list(lines, i)
                out.append(("list", lst))
            else:
                para = [line.strip()]
                i += 1
                while i < n and lines[i].strip() and not self._interrupts(lines, i):
                    para.append(lines[i].lstrip())
                    i += 1
                out.append(self._paragraph("\n".join(para)))
        out += [("html", "</details>")] * details
        return out, loose

    def _interrupts(self, lines: list[str], i: int) -> bool:
        line = lines[i]
        m = _ORDERED.match(line)
        return bool(_FENCE.match(line) or _HEADING.match(line) or _HR.match(line) or _DETAILS.match(line)
                    or line.lstrip().startswith(">") or self._table_start(lines, i)
                    or (_BULLET.match(line) and line.strip() not in "-*+") or (m and m[2] == "1" and m[4]))

    def _paragraph(self, text: str) -> tuple[str, str]:
        if _LONE_IMAGE.match(text):  # an image alone in its paragraph: a <figure>
            return "figure", self.inline(text, figure=True)
        return "p", f"<p>{self.inline(text)}</p>"

    @staticmethod
    def _cells(line: str) -> list[str]:
        line = line.strip()
        line = line[1:] if line.startswith("|") else line
        line = line[:-1] if line.endswith("|") and not line.endswith("\\|") else line
        cells, cur, code, j = [], "", 0, 0
        while j < len(line):
            c = line[j]
            if c == "\\" and j + 1 < len(line) and line[j + 1] == "|":
                cur, j = cur + "|", j + 2
                continue
            if c == "`":  # a pipe inside a code span does not split the cell
                run = len(line[j:]) - len(line[j:].lstrip("`"))
                if code == run:
                    code = 0
                elif not code and re.compile(rf"(?<!`)`{{{run}}}(?!`)").search(line, j + run):
                    code = run
                cur, j = cur + "`" * run, j + run
                continue
            if c == "|" and not code:
                cells.append(cur.strip())
                cur = ""
            else:
                cur += c
            j += 1
        return cells + [cur.strip()]

    def _table_start(self, lines: list[str], i: int) -> bool:
        return (i + 1 < len(lines) and "|" in lines[i] and bool(_DELIM.match(lines[i + 1]))
                and len(self._cells(lines[i])) == len(self._cells(lines[i + 1])))

    def _table(self, lines: list[str], i: int) -> tuple[str, int]:
        head = self._cells(lines[i])
        aligns = []
        for d in self._cells(lines[i + 1]):
            a = "center" if d.startswith(":") and d.endswith(":") else "right" if d.endswith(":") else \
                "left" if d.startswith(":") else ""
            aligns.append(f' style="text-align:{a}"' if a else "")
        i += 2
        rows = []
        while i < len(lines) and lines[i].strip() and "|" in lines[i] and not (
                _HEADING.match(lines[i]) or _FENCE.match(lines[i]) or lines[i].lstrip().startswith(">")):
            cells = (self._cells(lines[i]) + [""] * len(head))[:len(head)]
            tds = []
            for c, a in zip(cells, aligns, strict=True):
                cls = ' class="n"' if len(c) <= 40 and _NUMBER.match(c) else ""  # a number: never wrapped
                tds.append(f"<td{cls}{a}>{self.inline(c)}</td>")
            rows.append("<tr>" + "".join(tds) + "</tr>")
            i += 1
        ths = "".join(f'<th scope="col"{a}>{self.inline(h)}</th>' for h, a in zip(head, aligns, strict=True))
        return (f'<div class="table-wrap"><table class="sortable"><thead><tr>{ths}</tr></thead>'
                f"<tbody>{''.join(rows)}</tbody></table></div>"), i

    def _list(self, lines: list[str], i: int) -> tuple[str, int]:
        first = _ORDERED.match(lines[i])
        kind = (first[3] if first else _BULLET.match(lines[i])[2])
        items: list[tuple[list[tuple[str, str]], bool]] = []
        loose, n = False, len(lines)
        while i < n:
            m = _ORDERED.match(lines[i]) if first else _BULLET.match(lines[i])
            if not m or m[3 if first else 2] != kind:
                break
            spaces = m[m.lastindex]
            offset = m.end() - len(spaces) + (1 if len(spaces) > 4 or not spaces else len(spaces))
            body = [lines[i][offset:]]
            i += 1
            while i < n:
                line = lines[i]
                if not line.strip():
                    body.append("")
                elif len(line) - len(line.lstrip(" ")) >= offset:
                    body.append(line[offset:])
                elif body[-1] == "" or _BULLET.match(line) or _ORDERED.match(line) or self._interrupts(lines, i):
                    break
                else:  # a lazy continuation line of the item's paragraph
                    body.append(line.strip())
                i += 1
            trailing = len(body) - len("\n".join(body).rstrip("\n").split("\n"))
            blocks, item_loose = self.blocks(body[:len(body) - trailing])
            items.append((blocks, item_loose))
            loose = loose or item_loose
            if trailing:  # blank lines after the item: a sibling makes the list loose; else they are not ours
                nxt = i < n and (_ORDERED.match(lines[i]) if first else _BULLET.match(lines[i]))
                if not (nxt and nxt[3 if first else 2] == kind):
                    i -= trailing
                    break
                loose = True
        lis = []
        for blocks, _ in items:
            parts = [h[3:-4] if k == "p" and not loose else h for k, h in blocks]
            lis.append("<li>" + "\n".join(parts) + "</li>")
        start = int(first[2]) if first else 1
        tag = "ol" if first else "ul"
        attr = f' start="{start}"' if first and start != 1 else ""
        return f"<{tag}{attr}>" + "".join(lis) + f"</{tag}>", i

    # ------------------------------------------------------------ inline

    def inline(self, text: str, figure: bool = False) -> str:
        tokens: list[str] = []

        def hold(h: str) -> str:
            tokens.append(h)
            return f"\x00{len(tokens) - 1}\x00"

        out, j, n = [], 0, len(text)
        while j < n:
            c = text[j]
            if c == "\\" and j + 1 < n and (text[j + 1] in _ESCAPABLE or text[j + 1] == "\n"):
                out.append(hold("<br>\n" if text[j + 1] == "\n" else html.escape(text[j + 1])))
                j += 2
            elif c == "`":
                run = len(text[j:]) - len(text[j:].lstrip("`"))
                m = re.compile(rf"(?<!`)`{{{run}}}(?!`)").search(text, j + run)
                if not m:
                    out.append("`" * run)
                    j += run
                    continue
                code = text[j + run:m.start()].replace("\n", " ")
                if code.startswith(" ") and code.endswith(" ") and code.strip():
                    code = code[1:-1]
                out.append(hold(f"<code>{html.escape(code)}</code>"))
                j = m.end()
            elif c == "<" and (m := re.compile(r"<((?:https?|mailto):[^\s<>]+)>").match(text, j)):
                out.append(hold(f'<a href="{html.escape(m[1])}">{html.escape(m[1])}</a>'))
                j = m.end()
            elif c == "[" or (c == "!" and text[j + 1:j + 2] == "["):
                link = self._link(text, j + (c == "!"))
                if link is None:
                    out.append(c)
                    j += 1
                    continue
                label, url, end = link
                out.append(hold(self._image(label, url, figure) if c == "!" else self._anchor(label, url)))
                j = end
            else:
                out.append(c)
                j += 1
        s = html.escape("".join(out), quote=False)
        s = re.sub(r"(?<![\\*])\*\*(?=\S)(.+?)(?<=\S)\*\*", r"<strong>\1</strong>", s, flags=re.S)
        s = re.sub(r"(?<!\w)__(?=\S)(.+?)(?<=\S)__(?!\w)", r"<strong>\1</strong>", s, flags=re.S)
        s = re.sub(r"(?<![*\w])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![*\w])", r"<em>\1</em>", s, flags=re.S)
        s = re.sub(r"(?<!\w)_(?=[^\s_])(.+?)(?<=[^\s_])_(?!\w)", r"<em>\1</em>", s, flags=re.S)
        s = re.sub(r" {2,}\n", "<br>\n", s)
        return re.sub(r"\x00(\d+)\x00", lambda m: tokens[int(m[1])], s)

    @staticmethod
    def _link(text: str, j: int) -> tuple[str, str, int] | None:
        """``[label](url "title")`` starting at text[j] == "[": (label, url, end) or None."""
        depth, k, n = 0, j, len(text)
        while k < n:
            c = text[k]
            if c == "\\":
                k += 2
                continue
            if c == "`":
                run = len(text[k:]) - len(text[k:].lstrip("`"))
                m = re.compile(rf"(?<!`)`{{{run}}}(?!`)").search(text, k + run)
                k = m.end() if m else k + run
                continue
            depth += (c == "[") - (c == "]")
            if depth == 0:
                break
            k += 1
        if k >= n or text[k + 1:k + 2] != "(":
            return None
        m = re.compile(r"\(\s*(<[^<>\n]*>|(?:[^\s()\\]|\\.|\([^\s()]*\))*)(?:\s+\"[^\"]*\")?\s*\)").match(text, k + 1)
        if not m:
            return None
        url = m[1][1:-1] if m[1].startswith("<") else re.sub(r"\\(.)", r"\1", m[1])
        return text[j + 1:k], url, m.end()

    def _anchor(self, label: str, url: str) -> str:
        inner = self.inline(label)
        if not _SAFE_URL.match(url):
            return inner
        m = _FIGURE_URL.match(url)
        href = f"\x02{m[1]}\x1f{url}\x03" if m else html.escape(url)
        return f'<a href="{href}">{inner}</a>'

    def _image(self, alt: str, url: str, figure: bool) -> str:
        alt_text = html.escape(re.sub(r"[`*]", "", alt))
        m = _FIGURE_URL.match(url)
        path = self.figures_dir / (m[1] + Path(url).suffix) if m else self.figures_dir.parent / url
        if re.match(r"^[a-z][a-z0-9+.-]*:", url, re.I):  # never loaded from elsewhere: a link instead
            return f'<a href="{html.escape(url)}">{alt_text or html.escape(url)}</a>' if _SAFE_URL.match(url) \
                else alt_text
        if path.suffix.lower() == ".png" and path.with_suffix(".svg").is_file():
            path = path.with_suffix(".svg")
        if not path.is_file() or path.suffix.lower() not in MIME:
            return f'<span class="missing">[figure not found: {alt_text} ({html.escape(url)})]</span>'
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        stem = Path(url).stem
        fid = None if stem in self.fig_ids else self.fig_ids.setdefault(stem, self.new_id("fig-" + stem))
        img = f'<img class="figure" alt="{alt_text}" src="data:{MIME[path.suffix.lower()]};base64,{data}">'
        ident = f' id="{fid}"' if fid else ""
        return f"<figure{ident}>{img}</figure>" if figure else (f"<span{ident}>{img}</span>" if fid else img)

    # ------------------------------------------------------------ page

    def page(self, markdown_text: str, title: str) -> str:
        text = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", "\ufffd", markdown_text.replace("\r\n", "\n"))
        text = text.replace("\t", "    ")
        blocks, _ = self.blocks(text.split("\n"))
        header, sections, current = [], [], None
        for kind, h in blocks:
            if kind in ("h1", "h2") and (kind == "h2" or current is not None):
                current = []
                sections.append(current)
            (header if current is None else current).append(h)
        body = [f"<header>{''.join(header)}</header>"] if header else []
        if self.toc:
            links = "".join(f'<li><a href="#{i}">{re.sub(r"<a [^>]*>|</a>", "", h)}</a></li>' for i, h in self.toc)
            body.append(f'<nav id="toc" aria-label="Contents"><ol>{links}</ol></nav>')
        for k, sec in enumerate(sections):
            sid = ' id="findings"' if k == 0 else ""
            body.append(f"<section{sid}>" + "\n".join(sec) + "</section>")
        doc = "\n".join(body)
        doc = re.sub(r"\x02([^\x1f]*)\x1f([^\x03]*)\x03",
                     lambda m: "#" + self.fig_ids[m[1]] if m[1] in self.fig_ids else html.escape(m[2]), doc)
        doc = doc.replace('<img class="figure"', '<img id="summary-figure" class="figure"', 1)
        return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
                f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
                '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
                f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n{doc}\n"
                f"</main>\n<script>{SORT_JS}</script>\n</body>\n</html>\n")


CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

CSS = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--head:#f0f3f6;--link:#0969da}*{box-sizing:border-box}
body{margin:0;color:var(--fg);background:#fff;
font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Liberation Sans",Arial,sans-serif}
main{max-width:1200px;margin:0 auto;padding:12px 24px 48px}h1{font-size:1.55em;margin:.2em 0 .3em}
h2{font-size:1.3em;margin:1.3em 0 .5em;padding-bottom:.15em;border-bottom:1px solid var(--line)}
section#findings>h2:first-child{margin-top:.6em}h3{font-size:1.1em;margin:1.1em 0 .4em}
h4{font-size:1em;margin:1em 0 .3em}header ul{margin:.2em 0;padding-left:1.2em;color:var(--muted);font-size:.88em}
nav#toc{font-size:.85em;margin:.5em 0 0;padding:.3em 0;border-top:1px solid var(--line);
border-bottom:1px solid var(--line)}
nav#toc ol{list-style:none;margin:0;padding:0;display:flex;flex-wrap:wrap;gap:.1em 1.1em}
a{color:var(--link);text-decoration:none}a:hover{text-decoration:underline}p,li{max-width:100%}
code{font:.86em/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace;background:#eff2f5;
padding:.1em .3em;border-radius:4px;overflow-wrap:anywhere}
pre{background:#f6f8fa;padding:10px 12px;overflow-x:auto;border-radius:6px}
pre code{background:none;padding:0;white-space:pre;overflow-wrap:normal}
blockquote{margin:.6em 0;padding:0 1em;color:var(--muted);border-left:3px solid var(--line)}
.table-wrap{overflow:auto;max-height:640px;width:fit-content;max-width:100%;margin:.5em 0 1em;
border:1px solid var(--line);border-radius:6px}
table{border-collapse:separate;border-spacing:0;font-size:.84em;font-variant-numeric:tabular-nums}
th,td{padding:3px 9px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
td.n{white-space:nowrap}
th{position:sticky;top:0;z-index:1;background:var(--head);cursor:pointer;user-select:none;min-width:4em}
th:hover{background:#e3e8ee}th[aria-sort=ascending]::after{content:" \\25B2";font-size:.8em}
th[aria-sort=descending]::after{content:" \\25BC";font-size:.8em}tbody tr:nth-child(even) td{background:#fafbfc}
tbody tr:hover td{background:#eef4ff}figure{margin:.6em 0}img{max-width:100%;height:auto}figure img{display:block}
.missing{color:#b3261e}@media print{.table-wrap{max-height:none;overflow:visible}th{position:static}}
"""

SORT_JS = r"""
(function(){
  var EMPTY=/^(—|-|n\/a|\?)?$/i;
  function key(t){
    var m=t.replace(/\u2212/g,'-').replace(/,(?=\d{3})/g,'')
      .match(/^[<>≤≥~≈]?\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)/i);
    return m?parseFloat(m[1]):null;
  }
  function sortBy(table,heads,th,col){
    var body=table.tBodies[0], rows=Array.prototype.slice.call(body.rows);
    var dir=th.getAttribute('aria-sort')==='ascending'?-1:1;
    var texts=rows.map(function(r){var c=r.cells[col];return c?c.textContent.trim():'';});
    var numeric=texts.some(function(t){return !EMPTY.test(t);})&&
      texts.every(function(t){return EMPTY.test(t)||key(t)!==null;});
    var idx=rows.map(function(r,i){return i;});
    idx.sort(function(a,b){
      var x=texts[a],y=texts[b],ex=EMPTY.test(x),ey=EMPTY.test(y);
      if(ex||ey)return (ex-ey)||(a-b);
      var c=numeric?key(x)-key(y):0;
      if(!c)c=x.localeCompare(y,undefined,{numeric:true,sensitivity:'base'});
      return c*dir||(a-b);
    });
    idx.forEach(function(i){body.appendChild(rows[i]);});
    Array.prototype.forEach.call(heads,function(h){h.setAttribute('aria-sort','none');});
    th.setAttribute('aria-sort',dir===1?'ascending':'descending');
  }
  Array.prototype.forEach.call(document.querySelectorAll('table.sortable'),function(table){
    var heads=table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads,function(th,col){
      th.tabIndex=0;th.setAttribute('aria-sort','none');th.title='Sort by this column (again: reverse)';
      th.addEventListener('click',function(){sortBy(table,heads,th,col);});
      th.addEventListener('keydown',function(e){
        if(e.key==='Enter'||e.key===' '){e.preventDefault();sortBy(table,heads,th,col);}
      });
    });
  });
})();
"""


def render_html(markdown_text: str, figures_dir: Path, title: str) -> str:
    """The page of ``markdown_text``; images under ``figures/`` come from ``figures_dir``, other relative
    images from its parent (the report's folder)."""
    return _Renderer(Path(figures_dir)).page(markdown_text, title)


def page_title(markdown_text: str) -> str:
    """The text of the first h1 (markup dropped), else "kvmatrix report"."""
    m = re.search(r"^# +(.+?)\s*#*\s*$", markdown_text, re.M)
    return re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", m[1]).strip() if m else "kvmatrix report"


def write_html(out_dir: Path, markdown_text: str) -> Path:
    """``out_dir/report.html`` (atomically) from the report's markdown; figures from ``out_dir/figures``."""
    out_dir = Path(out_dir)
    page = render_html(markdown_text, out_dir / "figures", page_title(markdown_text))
    return write_text_atomic(out_dir / HTML_NAME, page)


# ---------------------------------------------------------------- headless Chromium


def chromium_binary() -> str:
    """The chromium on PATH (``chromium``, ``chromium-browser``); ChromiumError when there is none."""
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    raise ChromiumError("no chromium binary on PATH (chromium, chromium-browser); install Debian's "
                        "`chromium` package to render report.html")


def _chromium(args: list[str], width: int, height: int, timeout: float) -> str:
    """Run headless Chromium once in its own process group with a throw-away profile (also its HOME, so the
    crash handler it starts in a session of its own is marked by that folder); its stdout. When it returns,
    fails or times out, its group and every process naming that folder are killed: nothing outlives the call."""
    exe = chromium_binary()
    with tempfile.TemporaryDirectory(prefix="kvmatrix-chromium-", ignore_cleanup_errors=True) as profile:
        # --no-sandbox: the sandbox cannot start as root or in most containers; the page is our own local file,
        # which its Content-Security-Policy keeps off the network
        cmd = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               "--no-default-browser-check", "--disable-extensions", "--disable-sync", "--mute-audio",
               "--disable-background-networking", "--disable-component-update", "--disable-breakpad",
               "--disable-crash-reporter", f"--user-data-dir={profile}",
               f"--window-size={width},{height}", *args]
        env = dict(os.environ, HOME=profile, XDG_CONFIG_HOME=f"{profile}/.config", XDG_CACHE_HOME=f"{profile}/.cache")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc.pid, profile)
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
            raise ChromiumError(f"chromium did not finish within {timeout:g} s ({' '.join(args[-1:])})") from None
        finally:
            _kill(proc.pid, profile)
    if proc.returncode != 0:
        tail = [ln for ln in err.decode(errors="replace").splitlines() if "dbus" not in ln][-1:]
        raise ChromiumError(f"chromium exited with status {proc.returncode}: {' '.join(tail) or 'no output'}")
    return out.decode(errors="replace")


def _kill(pgid: int, marker: str) -> None:
    """SIGKILL the process group ``pgid`` and every live process whose command line contains ``marker``
    (this call's own temporary folder), then wait a moment for them to go."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for _ in range(50):
        left = _marked(marker)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.02)


def _marked(marker: str) -> list[int]:
    """Live (not zombie) processes whose command line contains ``marker``; [] without /proc."""
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if marker.encode() in (d / "cmdline").read_bytes() and \
                    (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(d.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def screenshot(html_path: Path, png_path: Path, width: int = 1280, height: int = 900, timeout: float = 120) -> Path:
    """A PNG of the page's first screen (``width`` x ``height``), written atomically to ``png_path``."""
    url = Path(html_path).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="kvmatrix-shot-") as tmp:
        shot = Path(tmp) / "shot.png"
        _chromium([f"--screenshot={shot}", "--run-all-compositor-stages-before-draw", url], width, height, timeout)
        if not shot.is_file() or shot.stat().st_size == 0:
            raise ChromiumError(f"chromium wrote no screenshot of {html_path}")
        with atomic_target(png_path) as target:
            shutil.copyfile(shot, target)
    return Path(png_path)


PROBE_JS = """
addEventListener('load',function(){
  var out={innerWidth:innerWidth,innerHeight:innerHeight,scrollY:scrollY,boxes:{},extra:null};
  ['findings','summary-figure','toc'].forEach(function(id){
    var e=document.getElementById(id);if(!e)return;var r=e.getBoundingClientRect();
    out.boxes[id]={tag:e.tagName.toLowerCase(),top:r.top,left:r.left,width:r.width,height:r.height,
      complete:e.complete===undefined?null:e.complete,naturalWidth:e.naturalWidth===undefined?null:e.naturalWidth,
      children:e.childElementCount};
  });
  try{out.extra=(function(){%s})();}catch(err){out.extra={error:String(err)};}
  document.documentElement.setAttribute('data-kvmatrix-probe',JSON.stringify(out));
});
"""


def probe(html_path: Path, width: int = 1280, height: int = 900, extra_js: str = "", timeout: float = 120) -> dict:
    """Lay the page out in headless Chromium at a ``width`` x ``height`` viewport and return, after its load
    event, the viewport size and the bounding boxes of ``#findings``, ``#summary-figure`` and ``#toc``
    (plus ``naturalWidth`` / ``complete`` of an image); ``extra_js`` is a function body whose return value
    comes back as ``extra``. The page is probed from a copy with the probe script appended."""
    page = Path(html_path).read_text()
    script = "<script>" + PROBE_JS % extra_js + "</script>"
    page = page.replace("</body>", script + "</body>", 1) if "</body>" in page else page + script
    with tempfile.TemporaryDirectory(prefix="kvmatrix-probe-") as tmp:
        copy = Path(tmp) / Path(html_path).name
        copy.write_text(page)
        for _ in range(3):  # headless Chromium's viewport can be shorter than its window: find the window
            window = height + _WINDOW_EXTRA.get((width, height), 0)
            dom = _chromium(["--dump-dom", copy.resolve().as_uri()], width, window, timeout)
            m = re.search(r'data-kvmatrix-probe="([^"]*)"', dom)
            if not m:
                raise ChromiumError(f"the probe of {html_path} returned no result")
            result = json.loads(html.unescape(m[1]))
            if result["innerHeight"] == height:
                break
            _WINDOW_EXTRA[(width, height)] = window - result["innerHeight"]
    return result


#: (width, height) -> how much taller than its viewport the probe's window must be (learnt on first use)
_WINDOW_EXTRA: dict[tuple[int, int], int] = {}


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m kvmatrix.analysis.html", description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path, metavar="DIR", help="report folder holding report.md (and figures/)")
    ap.add_argument("--screenshot", action="store_true", help=f"also write DIR/{SCREENSHOT_NAME} (headless Chromium)")
    ap.add_argument("--width", type=int, default=1280, help="screenshot width in px (default 1280)")
    ap.add_argument("--height", type=int, default=900, help="screenshot height in px (default 900)")
    args = ap.parse_args(argv)
    md = args.dir / "report.md"
    if not md.is_file():
        print(f"kvmatrix: error: no report.md in {args.dir}; write it first (python -m kvmatrix.analysis.report "
              "DIR)", file=sys.stderr)
        return 2
    page = write_html(args.dir, md.read_text())
    print(page)
    if args.screenshot:
        try:
            print(screenshot(page, args.dir / SCREENSHOT_NAME, args.width, args.height))
        except ChromiumError as exc:
            print(f"kvmatrix: error: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
