"""report.html: the markdown -> HTML converter (tables, lists, escaping, inlined figures, no network loads), every
committed write-up under docs/results, and the page in a real headless Chromium (first screen, sorting, screenshot)."""

from __future__ import annotations

import re
import shutil
import time
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest

from kvmatrix.analysis import html as H

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
DEMO = RESULTS / "cpu-demo-2026-12-01"
WRITE_UPS = sorted(RESULTS.rglob("*.md"))
PNG_1PX = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                        "1f15c4890000000d49444154789c63f8cfc0f01f0005000201a5e3d7e0000000"
                        "0049454e44ae426082")


def render(md: str, figures: Path | None = None) -> str:
    return H.render_html(md, figures or Path("/nonexistent/figures"), "t")


def body(page: str) -> str:
    return page[page.index("<main>"):page.index("</main>")]


class _Text(HTMLParser):
    """The visible text of <main> (the table of contents left out), and every src / href."""

    def __init__(self):
        super().__init__()
        self.text, self.loads, self.hrefs, self._skip, self._main = [], [], [], 0, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "main":
            self._main = True
        if tag in ("nav", "script", "style", "title"):
            self._skip += 1
        if "src" in a:
            self.loads.append(a["src"])
        if tag == "link" and "href" in a:
            self.loads.append(a["href"])
        if tag == "a" and "href" in a:
            self.hrefs.append(a["href"])

    def handle_endtag(self, tag):
        if tag in ("nav", "script", "style", "title"):
            self._skip -= 1

    def handle_data(self, data):
        if self._main and not self._skip:
            self.text.append(data)


def parse(page: str) -> _Text:
    p = _Text()
    p.feed(page)
    return p


# ---------------------------------------------------------------- the converter


def test_pipe_table_becomes_a_sortable_table():
    md = ("| Phase   | A/B     | Hit (ms) [CI]      | note |\n|:--------|--------:|:---:|---|\n"
          "| 3a      | 512/256 | 18.5 [15.8, 23.5]  | `a|b` and a \\| pipe |\n| 1 | 256/512 | — |\n")
    b = body(render(md))
    assert b.count("<table") == 1 and 'class="sortable"' in b and '<div class="table-wrap">' in b
    assert b.count("<th ") == 4 and b.count("<tr>") == 3
    assert '<th scope="col" style="text-align:left">Phase</th>' in b
    assert '<td class="n" style="text-align:right">512/256</td>' in b
    assert '<td class="n" style="text-align:center">18.5 [15.8, 23.5]</td>' in b
    assert "<td><code>a|b</code> and a | pipe</td>" in b  # a pipe in code or escaped does not split
    assert b.count("<td") == 8  # the short row is padded to the header's four cells


def test_lists_nested_ordered_tight_and_loose():
    md = ("- one\n- two with `code`\n  - nested **bold**\n    continued lazily\n  - nested 2\n- three\n\n"
          "3. third\n4. fourth\n   - inner\n\n   a second paragraph\n5. fifth\n")
    b = body(render(md))
    assert "<ul><li>one</li><li>two with <code>code</code>\n<ul><li>nested <strong>bold</strong>\ncontinued lazily" in b
    assert "<li>nested 2</li></ul></li><li>three</li></ul>" in b
    ol = b[b.index("<ol"):]
    assert ol.startswith('<ol start="3"><li><p>third</p></li>')  # loose: a blank line inside item 4
    assert "<p>a second paragraph</p></li><li><p>fifth</p></li></ol>" in ol
    assert "<ul><li>inner</li></ul>" in ol


def test_text_is_escaped_everywhere():
    md = ("# Title <b>\n\nA <script>alert(1)</script> & \"quotes\" 1 < 2 > 0\n\n"
          "| h <i> |\n|---|\n| <img src=x onerror=alert(1)> |\n\n"
          "`<code> & stuff` [x<y](https://example.com/?a=1&b=\"2\") [bad](javascript:alert(1))\n\n"
          "```html\n<div>fenced & raw</div>\n```\n\n<details>\n<summary>More <u>x</u></summary>\n\ninside\n\n</details>\n")
    page = render(md)
    b = body(page)
    assert "<script>" not in b and "<b>" not in b and "<i>" not in b and "<img src=x" not in b
    assert "A &lt;script&gt;alert(1)&lt;/script&gt; &amp; \"quotes\" 1 &lt; 2 &gt; 0" in b
    assert "<td>&lt;img src=x onerror=alert(1)&gt;</td>" in b
    assert "<code>&lt;code&gt; &amp; stuff</code>" in b
    assert '<a href="https://example.com/?a=1&amp;b=&quot;2&quot;">x&lt;y</a>' in b
    assert "javascript:" not in page and "bad" in b  # an unsafe link keeps its text, loses its target
    assert '<pre><code class="language-html">&lt;div&gt;fenced &amp; raw&lt;/div&gt;</code></pre>' in b
    assert "<details>" in b and "<summary>More &lt;u&gt;x&lt;/u&gt;</summary>" in b and "</details>" in b
    assert page.count("<script>") == 1  # the page's own sort script only


def test_inline_emphasis_code_links_and_intraword_underscores():
    b = body(render("**bold** and *it* and _it2_; n_batch, fig1_panels, 2 * 3 * 4, a*b*c, \\*lit\\*, "
                    "`x*y*z` [`fig.png`](report.md) <https://example.org/a>\n"))
    assert "<strong>bold</strong> and <em>it</em> and <em>it2</em>; n_batch, fig1_panels, 2 * 3 * 4, a*b*c" in b
    assert "*lit*" in b and "<code>x*y*z</code>" in b
    assert '<a href="report.md"><code>fig.png</code></a>' in b
    assert '<a href="https://example.org/a">https://example.org/a</a>' in b


def test_headings_get_ids_findings_section_and_toc():
    md = ("# Report\n\n- Runs: demo\n\n## Findings\n\ntext\n\n### Sub part\n\n## Findings\n\n## Other `x`\n\nend\n")
    page = render(md)
    b = body(page)
    assert b.startswith('<main>\n<header><h1 id="report">Report</h1><ul><li>Runs: demo</li></ul></header>')
    assert '<section id="findings"><h2 id="findings-1">Findings</h2>' in b  # "findings" is the section's
    assert '<h3 id="sub-part">Sub part</h3>' in b and '<h2 id="findings-2">Findings</h2>' in b
    assert '<h2 id="other-x">Other <code>x</code></h2>' in b
    toc = b[b.index('<nav id="toc"'):b.index("</nav>")]
    assert re.findall(r'href="#([^"]+)"', toc) == ["findings-1", "findings-2", "other-x"]
    assert b.count("<section") == 3 and "<title>t</title>" in page


@pytest.fixture
def figures(tmp_path):
    f = tmp_path / "figures"
    f.mkdir()
    (f / "both.png").write_bytes(PNG_1PX)
    (f / "both.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    (f / "png_only.png").write_bytes(PNG_1PX)
    return f


def test_figures_inlined_svg_preferred_links_become_anchors(figures):
    md = ("# R\n\n## Summary\n\n- finding\n\n![Both](figures/both.png)\n\n*Both* — caption ([SVG](figures/both.svg))\n\n"
          "## Later\n\n![Only PNG](figures/png_only.png)\n\n- [`both.png`](figures/both.png), "
          "[`gone.png`](figures/gone.png)\n\nInline ![again](figures/both.png) and ![web](https://example.com/x.png) "
          "and ![lost](figures/lost.png).\n")
    page = render(md, figures)
    b = body(page)
    first = b.index("<img")
    assert b[first:].startswith('<img id="summary-figure" class="figure" alt="Both" src="data:image/svg+xml;base64,')
    assert b.count('id="summary-figure"') == 1
    assert '<figure id="fig-both"><img id="summary-figure"' in b
    assert '<figure id="fig-png_only"><img class="figure" alt="Only PNG" src="data:image/png;base64,iVBOR' in b
    assert b.count('href="#fig-both"') == 2  # the SVG link and the PNG link both point at the inlined figure
    assert 'href="figures/gone.png"' in b  # not inlined anywhere: stays a plain relative link
    assert b.count("<img") == 3 and b.count('id="fig-both"') == 1  # the repeat is inlined again, without the id
    assert '<a href="https://example.com/x.png">web</a>' in b  # a web image is never loaded: a link instead
    assert '<span class="missing">[figure not found: lost (figures/lost.png)]</span>' in b
    assert '<section id="findings"><h2 id="summary">Summary</h2>' in b


def test_no_network_loads(figures):
    md = "# R\n\n[site](https://example.com/page) ![web](http://example.com/y.svg) ![ok](figures/both.png)\n"
    page = render(md, figures)
    p = parse(page)
    assert p.loads and all(s.startswith("data:image/") for s in p.loads)
    assert "https://example.com/page" in p.hrefs and "http://example.com/y.svg" in p.hrefs
    assert not re.search(r"""(?:src|srcset|poster|data)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert not re.search(r"<link\b|<iframe|<object|<embed|@import|url\(", page, re.I)
    assert "Content-Security-Policy" in page and "default-src 'none'; img-src data:" in page


def test_write_html_and_the_command(tmp_path, figures, capsys):
    md = "# My report\n\n## Summary\n\n![Both](figures/both.png)\n"
    (tmp_path / "report.md").write_text(md)
    out = H.write_html(tmp_path, md)
    assert out == tmp_path / "report.html" and "<title>My report</title>" in out.read_text()
    assert not list(tmp_path.glob(".report.html*"))  # no temp file left behind
    assert H.main([str(tmp_path)]) == 0 and capsys.readouterr().out.strip() == str(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert H.main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kvmatrix: error: no report.md in")


# ---------------------------------------------------------------- every committed write-up


def _outside_fences(md: str) -> list[str]:
    lines, fenced = [], False
    for line in md.split("\n"):
        if re.match(r"^\s*(```|~~~)", line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _words(text: str) -> Counter:
    return Counter(re.findall(r"[A-Za-z0-9]+", text))


@pytest.mark.parametrize("md_path", WRITE_UPS, ids=[str(p.relative_to(RESULTS)) for p in WRITE_UPS])
def test_every_committed_write_up_converts(md_path):
    md = md_path.read_text()
    page = H.render_html(md, md_path.parent / "figures", H.page_title(md))
    b = body(page)
    lines = _outside_fences(md)
    delim = re.compile(r"^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)+\|?\s*$")
    tables = sum(1 for a, d in zip(lines, lines[1:], strict=False) if "|" in a and delim.match(d))
    rows = sum(1 for ln in lines if ln.lstrip().startswith("|") and not delim.match(ln))
    assert b.count("<table") == tables and b.count("<tr>") == rows
    images = sum(ln.count("![") for ln in lines)
    assert b.count('<img class="figure"') + b.count('<img id="summary-figure"') == images
    assert 'class="missing"' not in b and 'href="figures/' not in b  # every figure inlined, every link in-page
    assert all(s.startswith("data:image/") for s in parse(page).loads)
    if images:
        assert b.count('id="summary-figure"') == 1
    if "\n## " in md:
        assert b.count('<section id="findings">') == 1
    # the same text as the markdown: every word and number, nothing lost, nothing added
    plain = re.sub(r"!\[[^\]]*\]\([^)\s]*\)", " ", md)
    plain = re.sub(r"\]\([^)\s]*\)", "] ", plain)
    plain = re.sub(r"^(\s*)\d+[.)](\s)", r"\1\2", plain, flags=re.M)  # <ol> numbers are not text
    plain = re.sub(r"^\s*(```|~~~)\S*", " ", plain, flags=re.M)
    shown = " ".join(parse(page).text)
    assert _words(shown) == _words(plain)
    assert "**" not in re.sub(r"<code>.*?</code>", "", b, flags=re.S)


# ---------------------------------------------------------------- headless Chromium


def _chromium_or_skip() -> None:
    try:
        H.chromium_binary()
    except H.ChromiumError as exc:
        pytest.skip(str(exc))


SORT_JS = """
var t=document.querySelectorAll('table.sortable')[1], th=t.tHead.rows[0].cells[1];
function col(){return Array.prototype.map.call(t.tBodies[0].rows,function(r){return r.cells[0].textContent;});}
th.click(); var asc=col(), a1=th.getAttribute('aria-sort'); th.click(); var desc=col(), a2=th.getAttribute('aria-sort');
t.tHead.rows[0].cells[0].click(); var text=col();
return {asc:asc, desc:desc, text:text, a1:a1, a2:a2, a3:th.getAttribute('aria-sort')};
"""


def _summary_report(tmp_path: Path) -> Path:
    """A report folder like the lead's: header, a short Summary (findings) with the summary figure, more sections."""
    (tmp_path / "figures").mkdir()
    for ext in ("png", "svg"):
        shutil.copy(DEMO / "figures" / f"fig1_invalidation_cost.{ext}", tmp_path / "figures")
    rows = [("b", "18.5 [15.8, 23.5]"), ("a", "−3.2"), ("c", "—"), ("d", "1,660"), ("e", "< 1e-6"), ("f", "9.7×")]
    md = ("# KV cache invalidation: cache hit vs cache miss TTFT\n\n- Runs: demo\n- Cells: 26 (26 ok, 0 failed)\n\n"
          "## Summary\n\n- **tiny, 3a llamacpp_http**: a miss costs +35.3 [+29.7, +54.9] ms.\n"
          "- **tiny, 1 vllm_http**: a miss costs +16.0 [+6.8, +19.9] ms.\n\n"
          "![Invalidation cost](figures/fig1_invalidation_cost.png)\n\n*Invalidation cost* — hit vs miss "
          "([SVG](figures/fig1_invalidation_cost.svg))\n\n## Tables\n\n| a | b |\n|---|---|\n| x | 1 |\n\n"
          "| name | value |\n|---|---|\n" + "".join(f"| {n} | {v} |\n" for n, v in rows) + "\n## More\n\n"
          + "Filler paragraph.\n\n" * 60)
    (tmp_path / "report.md").write_text(md)
    return H.write_html(tmp_path, md)


def _alive_chromium() -> list[int]:
    """Live processes of any of this module's Chromium runs (its temporary profile is in their command line)."""
    return H._marked("kvmatrix-chromium-")


def _screen(png: Path):
    mpimg = pytest.importorskip("matplotlib.image")
    return mpimg.imread(png)[..., :3]


def test_chromium_first_screen_shows_findings_and_summary_figure(tmp_path):
    _chromium_or_skip()
    t0 = time.monotonic()
    page = _summary_report(tmp_path)
    r = H.probe(page, 1280, 900, extra_js=SORT_JS)
    assert r["innerWidth"] == 1280 and r["innerHeight"] == 900 and r["scrollY"] == 0
    f, fig = r["boxes"]["findings"], r["boxes"]["summary-figure"]
    assert f["tag"] == "section" and 0 <= f["top"] < 900 and f["height"] > 0
    assert fig["tag"] == "img" and fig["complete"] and fig["naturalWidth"] > 0
    assert 0 <= fig["top"] < 900 and fig["height"] > 100 and fig["top"] + fig["height"] <= 900  # wholly on screen
    assert fig["width"] <= 1280 - 2 * 24  # max-width 100% of the page
    s = r["extra"]
    assert s["asc"] == ["a", "e", "f", "b", "d", "c"], s  # − minus, "< 1e-6", "9.7×", thousands; — last
    assert s["desc"] == ["d", "b", "f", "e", "a", "c"] and (s["a1"], s["a2"]) == ("ascending", "descending")
    assert s["text"] == ["a", "b", "c", "d", "e", "f"] and s["a3"] == "none"  # another column: text, ascending

    png = H.screenshot(page, tmp_path / "first.png", 1280, 900)
    img = _screen(png)
    assert img.shape[:2] == (900, 1280)
    top = img[:300]
    assert top.std() > 0.05 and (top.mean(axis=2) < 0.9).mean() > 0.01  # text on the screen, not a blank page
    region = img[int(fig["top"]):int(fig["top"] + fig["height"]), int(fig["left"]):int(fig["left"] + fig["width"])]
    assert region.std() > 0.05  # the figure is drawn where the probe found it
    assert not _alive_chromium(), "a chromium outlived the call"
    assert time.monotonic() - t0 < 60


def test_chromium_committed_report_first_screen(tmp_path):
    _chromium_or_skip()
    (tmp_path / "figures").symlink_to(DEMO / "figures")
    page = H.write_html(tmp_path, (DEMO / "report.md").read_text())
    r = H.probe(page, 1280, 900)
    f, fig = r["boxes"]["findings"], r["boxes"]["summary-figure"]
    assert 0 <= f["top"] < 900 and f["height"] > 0
    assert fig["complete"] and fig["naturalWidth"] > 0 and fig["height"] > 0


def test_chromium_timeout_leaves_no_process(tmp_path):
    _chromium_or_skip()
    page = _summary_report(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(H.ChromiumError, match="^chromium did not finish within 0.3 s"):
        H.screenshot(page, tmp_path / "never.png", timeout=0.3)
    assert time.monotonic() - t0 < 10 and not (tmp_path / "never.png").exists()
    assert not _alive_chromium(), "a chromium outlived its timeout"


def test_screenshot_errors_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(H.shutil, "which", lambda name: None)
    with pytest.raises(H.ChromiumError, match="^no chromium binary on PATH") as exc:
        H.screenshot(tmp_path / "x.html", tmp_path / "x.png")
    assert "\n" not in str(exc.value)
