"""Check the built documentation site as a reader's browser sees it.

    python docs/browser_check.py [--html docs/_build/html] [--screenshots DIR] [PAGE ...]

Two checks, each failing with one line per fault (exit status 1):

1. **Internal links** (every built page, no browser): every local ``href``/``src`` of every HTML file resolves to
   a file of the build, and a ``#fragment`` into a page names an ``id`` of that page. (``sphinx -b linkcheck`` needs
   the internet; this needs none.)
2. **Rendering** (Debian's ``chromium`` in headless mode; by default the landing page, one method page and one
   tutorial): the DOM after the page's scripts ran (``--dump-dom``) has visible text, no Sphinx error box and no
   notebook traceback; every ``<img>`` points at a non-empty PNG, JPEG, GIF or SVG file (or data URI); the
   browser's console shows no uncaught JavaScript error and no failed load of a local file (loads from the
   internet — MathJax's CDN — are allowed to fail on an offline machine); and a screenshot (1200×1600) is not a
   blank page. The screenshots are written to ``--screenshots`` (default ``docs/_build/screenshots``).

Chromium is found as ``chromium``, ``chromium-browser`` or ``google-chrome`` on the PATH (``apt-get install
chromium``); without one the rendering check fails with that message (``--links-only`` skips it).
"""

from __future__ import annotations

import argparse
import base64
import html.parser
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

DOCS = Path(__file__).resolve().parent
DEFAULT_PAGES = ("index.html", "methods/ladder.html", "tutorials/notebooks/01_vae_in_pyro.html")
IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")


class _Collector(html.parser.HTMLParser):
    """Links (href/src), image sources and ids of one HTML document."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.links: list[tuple[str, str]] = []
        self.images: list[str] = []
        self.ids: set[str] = set()
        self.text: list[str] = []
        self.classes: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if a.get("name") and tag == "a":
            self.ids.add(a["name"])
        if a.get("class"):
            self.classes.extend(a["class"].split())
        for key in ("href", "src"):
            if a.get(key) is not None and tag in ("a", "link", "img", "script", "iframe", "source"):
                self.links.append((tag, a[key]))
        if tag == "img" and a.get("src") is not None:
            self.images.append(a["src"])
        if tag in ("script", "style"):
            self._skip += 1

    def handle_endtag(self, tag):
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.text.append(data)


def parse(text: str) -> _Collector:
    c = _Collector()
    c.feed(text)
    return c


def _is_local(url: str) -> bool:
    scheme = urllib.parse.urlsplit(url).scheme
    return scheme in ("", "file") and not url.startswith("//")


def check_links(root: Path) -> list[str]:
    """Faults of the internal links of every HTML file under ``root``."""
    pages = sorted(root.rglob("*.html"))
    if not pages:
        return [f"{root}: no HTML files (build the site first: python -m sphinx -W -b html docs docs/_build/html)"]
    parsed = {p.resolve(): parse(p.read_text(encoding="utf-8", errors="replace")) for p in pages}
    faults = []
    for page, doc in parsed.items():
        for tag, url in doc.links:
            if not url or not _is_local(url) or url.startswith(("mailto:", "javascript:", "data:")):
                continue
            parts = urllib.parse.urlsplit(url)
            if not parts.path:  # a fragment of this page
                target = page
            else:
                target = (page.parent / urllib.parse.unquote(parts.path)).resolve()
                if target.is_dir():
                    target = target / "index.html"
            where = page.relative_to(root.resolve())
            if not target.is_file():
                faults.append(f"{where}: <{tag}> {url} -> no such file")
                continue
            fragment = urllib.parse.unquote(parts.fragment)
            if fragment and target.suffix == ".html" and target in parsed and fragment not in parsed[target].ids:
                # search.html, genindex.html and the viewcode pages build some anchors with JavaScript: skip them
                if target.name not in ("search.html", "genindex.html"):
                    faults.append(f"{where}: <{tag}> {url} -> no id {fragment!r} in {target.name}")
    return faults


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _image_fault(src: str, page: Path) -> str | None:
    if src.startswith("data:"):
        head, _, payload = src.partition(",")
        if "svg" in head:
            return None if payload.strip() else "an empty SVG data URI"
        try:
            data = base64.b64decode(payload)
        except ValueError:
            return "an undecodable data URI"
        return None if data.startswith(IMAGE_SIGNATURES) else "a data URI that is not an image"
    if not _is_local(src):
        return None
    path = (page.parent / urllib.parse.unquote(urllib.parse.urlsplit(src).path)).resolve()
    if not path.is_file():
        return f"{src}: no such file"
    data = path.read_bytes()
    if not data:
        return f"{src}: an empty file"
    if path.suffix.lower() == ".svg":
        return None if b"<svg" in data[:4096] else f"{src}: not an SVG file"
    return None if data.startswith(IMAGE_SIGNATURES) else f"{src}: not a PNG, JPEG or GIF file"


def _blank(png: Path) -> bool:
    """A screenshot of one colour (or nearly): the page rendered nothing."""
    from PIL import Image

    with Image.open(png) as im:
        grey = im.convert("L")
        lo, hi = grey.getextrema()
        histogram = grey.histogram()
    return hi - lo < 16 or max(histogram) > 0.995 * sum(histogram)


# a console message in chromium's log: ...:INFO:CONSOLE:692] "msg", source: url (692)  (older: CONSOLE(692)] ...)
CONSOLE = re.compile(r'CONSOLE(?::\d+|\(\d+\))\] "(?P<msg>.*?)", source: (?P<src>\S*)')


def _console_faults(stderr: str) -> list[str]:
    faults = []
    for m in CONSOLE.finditer(stderr):
        msg, src = m.group("msg"), m.group("src")
        if msg.startswith("Uncaught") or ("Error" in msg and not msg.startswith("Failed to load resource")):
            faults.append(f"console: {msg} ({src})")
        elif msg.startswith("Failed to load resource") and src.startswith("file:"):
            faults.append(f"console: {msg} ({src})")
    for line in stderr.splitlines():
        if "net::ERR_FILE_NOT_FOUND" in line:
            faults.append(f"console: {line.strip()}")
    return faults


def check_page(chromium: str, root: Path, rel: str, shots: Path, timeout: float = 90.0) -> list[str]:
    """Faults of one page rendered by headless chromium; its screenshot goes to ``shots``."""
    page = (root / rel).resolve()
    if not page.is_file():
        return [f"{rel}: not built"]
    url = page.as_uri()
    shot = shots / (rel.replace("/", "_").removesuffix(".html") + ".png")
    with tempfile.TemporaryDirectory() as profile:
        common = [
            chromium,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--hide-scrollbars",
            "--no-first-run",
            "--disable-extensions",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=1",  # the level at which this chromium logs the page's console messages
            "--virtual-time-budget=8000",
            "--window-size=1200,1600",
        ]
        dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=timeout, check=False)
        snap = subprocess.run(
            [*common, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=timeout, check=False
        )
    faults = []
    if dom.returncode != 0 or not dom.stdout.strip():
        return [f"{rel}: chromium --dump-dom failed (status {dom.returncode}): {dom.stderr.strip()[-300:]}"]
    doc = parse(dom.stdout)
    # the page's own content (furo's <article role="main">), not the navigation around it
    main = re.search(r"<article\b[^>]*>(.*)</article>", dom.stdout, re.S)
    text = " ".join(" ".join(parse(main.group(1) if main else dom.stdout).text).split())
    if len(text) < 200:
        faults.append(f"{rel}: a blank page ({len(text)} characters of text in its main content)")
    text = " ".join(" ".join(doc.text).split())
    if "system-message" in doc.classes:
        faults.append(f"{rel}: a Sphinx error box (class system-message)")
    if "Traceback (most recent call last)" in text or any(c in doc.classes for c in ("traceback", "output_error")):
        faults.append(f"{rel}: an error output (a traceback) in the page")
    if not doc.images and rel.startswith(("methods/", "tutorials/")):
        faults.append(f"{rel}: no image at all (a method page shows its figure, a tutorial its plots)")
    for src in doc.images:
        fault = _image_fault(src, page)
        if fault:
            faults.append(f"{rel}: broken image {fault}")
    faults += [f"{rel}: {f}" for f in dict.fromkeys(_console_faults(dom.stderr + snap.stderr))]  # once each
    if snap.returncode != 0 or not shot.is_file():
        faults.append(f"{rel}: no screenshot (status {snap.returncode}): {snap.stderr.strip()[-300:]}")
    elif _blank(shot):
        faults.append(f"{rel}: the screenshot {shot} is blank")
    return faults


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pages", nargs="*", default=list(DEFAULT_PAGES), help="pages to render, relative to --html")
    p.add_argument("--html", type=Path, default=DOCS / "_build" / "html", help="the built site")
    p.add_argument("--screenshots", type=Path, default=DOCS / "_build" / "screenshots", help="folder of the PNGs")
    p.add_argument("--links-only", action="store_true", help="check the internal links only (no browser)")
    args = p.parse_args(argv)
    root = args.html.resolve()
    faults = check_links(root)
    print(f"internal links: {len(list(root.rglob('*.html')))} pages, {len(faults)} faults")
    if not args.links_only:
        chromium = find_chromium()
        if chromium is None:
            faults.append("no chromium on the PATH (apt-get install chromium), or pass --links-only")
        else:
            args.screenshots.mkdir(parents=True, exist_ok=True)
            for rel in args.pages:
                page_faults = check_page(chromium, root, rel, args.screenshots)
                print(f"{rel}: {'ok' if not page_faults else f'{len(page_faults)} faults'}")
                faults += page_faults
            print(f"screenshots: {args.screenshots}")
    for f in faults:
        print(f"FAULT {f}", file=sys.stderr)
    return 1 if faults else 0


if __name__ == "__main__":
    sys.exit(main())
