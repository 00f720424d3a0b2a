"""The built site in a real headless browser (``make docs-check``, after ``make docs``).

    python docs/check.py [--site site] [--browser /usr/bin/chromium]

Serves ``site/`` over HTTP on localhost and opens every page in Chromium driven by Playwright (the system's
Chromium, e.g. Debian's ``chromium`` package: Playwright downloads nothing). Fails (exit 1) when

- a page logs a console error, throws, or a request of it fails or answers >= 400;
- an image does not load (not complete, or zero natural width);
- an internal link (same origin) does not resolve, or names an anchor its page does not have;
- the leaderboard's table does not sort when a header is clicked (a numeric column ascending, then descending on
  the second click, and a text column).
"""

from __future__ import annotations

import argparse
import functools
import html
import re
import shutil
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urldefrag, urlparse

ROOT = Path(__file__).resolve().parent.parent
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
NUMBER = re.compile(r"[+-]?\d*\.?\d+(?:e[+-]?\d+)?", re.I)


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


def serve(site: Path) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def page_urls(site: Path, base: str) -> list[str]:
    pages = sorted(p.relative_to(site).as_posix() for p in site.rglob("index.html"))
    return [base + (p.removesuffix("index.html")) for p in pages]


def first_number(text: str) -> float | None:
    match = NUMBER.search(text.replace(",", ""))
    return float(match.group()) if match else None


def check_sorting(page, url: str) -> list[str]:
    """Click a numeric header twice and a text header once on the leaderboard; return the failures."""
    problems, log = [], []
    page.goto(url, wait_until="load")
    table = page.locator(".sortable table").first
    headers = [h.strip() for h in table.locator("thead th").all_inner_texts()]

    def column(name: str) -> list[str]:
        index = headers.index(name)
        return [c.strip() for c in table.locator(f"tbody tr td:nth-child({index + 1})").all_inner_texts()]

    for name in ("top-1", "speed-up, batch 32"):
        header = table.locator("thead th").nth(headers.index(name))
        for click, direction in ((1, "ascending"), (2, "descending")):
            header.click()
            values = [first_number(v) for v in column(name) if v]
            values = [v for v in values if v is not None]
            expected = sorted(values, reverse=direction == "descending")
            state = header.get_attribute("aria-sort")
            ok = values == expected and state == direction and len(values) > 1
            log.append(f"  sort by '{name}', click {click}: {direction} {'ok' if ok else 'WRONG'} "
                       f"({len(values)} values, first {values[:3]})")
            if not ok:
                problems.append(f"{url}: sorting by '{name}' (click {click}) is not {direction}")
    header = table.locator("thead th").nth(headers.index("method"))
    header.click()
    names = [v.lower() for v in column("method")]
    ok = names == sorted(names)
    log.append(f"  sort by 'method': ascending {'ok' if ok else 'WRONG'} ({names[0]} ... {names[-1]})")
    if not ok:
        problems.append(f"{url}: sorting by 'method' is not alphabetical")
    print("\n".join(log))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", default=str(ROOT / "site"), help="the built site (default: site/)")
    parser.add_argument("--browser", default=None, help="Chromium executable (default: the first on PATH of "
                        + ", ".join(BROWSERS) + ")")
    args = parser.parse_args(argv)
    site = Path(args.site)
    if not (site / "index.html").is_file():
        print(f"error: no built site in {site} (run `make docs`)", file=sys.stderr)
        return 2
    browser_path = args.browser or next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if browser_path is None:
        print("error: no Chromium found (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    server, base = serve(site)
    problems: list[str] = []
    links: dict[str, set[str]] = {}      # target page URL -> pages linking to it
    anchors: dict[tuple[str, str], str] = {}  # (target page URL, fragment) -> a page linking to it
    images = 0
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
            print(f"browser: {browser_path}, Chromium {browser.version}, Playwright driver")
            urls = page_urls(site, base)
            for url in urls:
                page = browser.new_page()  # a fresh page (and listeners) per URL
                errors: list[str] = []
                page.on("console", lambda m, e=errors: m.type == "error" and e.append(f"console: {m.text}"))
                page.on("pageerror", lambda exc, e=errors: e.append(f"exception: {exc}"))
                page.on("requestfailed", lambda r, e=errors: e.append(f"request failed: {r.url}"))
                page.on("response", lambda r, e=errors: r.status >= 400 and e.append(f"HTTP {r.status}: {r.url}"))
                page.goto(url, wait_until="load")
                page.wait_for_load_state("networkidle")
                imgs = page.eval_on_selector_all(
                    "img", "els => els.map(e => [e.currentSrc || e.src, e.complete && e.naturalWidth > 0])")
                images += len(imgs)
                errors += [f"image not loaded: {src}" for src, ok in imgs if not ok]
                for href in page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)"):
                    if not href.startswith(base):
                        continue
                    target, fragment = urldefrag(href)
                    links.setdefault(target, set()).add(url)
                    if fragment:
                        anchors.setdefault((target, fragment), url)
                page.close()
                problems += [f"{url}: {e}" for e in errors]
                print(f"page {urlparse(url).path:32s} {len(imgs):2d} images, {len(errors)} problems")
            page = browser.new_page()
            request = page.context.request
            bodies: dict[str, str] = {}
            for target, sources in sorted(links.items()):
                response = request.get(target)
                if response.status != 200:
                    problems.append(f"broken link {target} (from {sorted(sources)[0]}): HTTP {response.status}")
                elif "html" in response.headers.get("content-type", ""):
                    bodies[target] = response.text()
            missing = [(t, f, src) for (t, f), src in anchors.items()
                       if t in bodies and not re.search(rf'\b(id|name)="{re.escape(html.escape(f))}"', bodies[t])]
            problems += [f"missing anchor {t}#{f} (from {src})" for t, f, src in missing]
            print(f"{len(urls)} pages, {images} images, {len(links)} internal link targets, "
                  f"{len(anchors)} anchors checked")
            problems += check_sorting(page, base + "leaderboard/")
            browser.close()
    finally:
        server.shutdown()
    for problem in problems:
        print("FAIL", problem)
    print("docs-check: " + ("ok" if not problems else f"{len(problems)} problems"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
