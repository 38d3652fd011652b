"""Open every page of the built site in a headless Chromium and check what a reader would see.

Hand-written: it drives Debian's `chromium` through the DevTools protocol (with websocket-client),
so it sees the page after its scripts and MathJax have run, which no HTML linter does. For every
page, served from 127.0.0.1:

- no request leaves the machine (only 127.0.0.1, data: and blob: URLs are allowed): a reader
  offline, or one who should not be tracked, gets the whole book;
- no JavaScript error (such as a script declared twice);
- no raw TeX in the text (``$$``, ``\\frac``, ``\\text``: math MathJax did not render), no
  MathJax error, and no backslash left inside rendered math (``\\text{max\\_iters}`` shows
  its backslash);
- no Markdown table left as a paragraph of pipes;
- every chapter (``notebooks/*.html``) shows at least one figure, and every image loads.

Usage: ``python tools/check_site.py [HTML_DIR]`` (default ``build/site/_build/html``). Without a
Chromium it says so and exits 0, unless ``--require-browser`` (CI) makes that an error.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--remote-debugging-port=0",
]
LOCAL_SCHEMES = {"data", "blob", "about"}
LOCAL_HOSTS = {"127.0.0.1", "localhost"}

# Runs in the page once it has loaded: waits for MathJax, then reports what a reader would see.
INSPECT = r"""
(async () => {
  if (document.querySelector('script[src*="mathjax"]')) {
    for (let i = 0; i < 200 && !(window.MathJax && MathJax.startup && MathJax.startup.promise); i++)
      await new Promise(r => setTimeout(r, 50));
    if (window.MathJax && MathJax.startup) await MathJax.startup.promise;
  }
  const main = document.querySelector('article') || document.querySelector('main') || document.body;
  const skip = 'script, style, pre, code, mjx-container, .highlight, textarea';
  const walker = document.createTreeWalker(main, NodeFilter.SHOW_TEXT, {acceptNode: n =>
    n.parentElement.closest(skip) ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT});
  let text = '';
  while (walker.nextNode()) text += walker.currentNode.nodeValue + ' ';
  const tex = /\$\$|\\(frac|text|begin|end|sum|mathrm|sqrt|cdot|times|left|right)\b|\\\(|\\\[/g;
  const context = m => text.slice(Math.max(0, m.index - 30), m.index + 30).replace(/\s+/g, ' ');
  return {
    rawTex: [...text.matchAll(tex)].map(context),
    mathErrors: [...main.querySelectorAll('mjx-merror')].map(e => e.textContent.slice(0, 80)),
    mathBackslash: [...main.querySelectorAll('mjx-assistive-mml mtext, mjx-assistive-mml mi')]
      .map(e => e.textContent).filter(t => t.includes('\\')),
    pipeParagraphs: [...main.querySelectorAll('p')].filter(p => !p.closest(skip))
      .map(p => p.textContent)
      .filter(t => /\|\s*:?-{3,}/.test(t) || (t.match(/\|/g) || []).length >= 6)
      .map(t => t.slice(0, 80)),
    images: [...main.querySelectorAll('img')].map(i =>
      ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0})),
  };
})()
"""


class Browser:
    """A headless Chromium with a fresh profile, driven over the DevTools protocol."""

    def __init__(self, executable: str, profile: Path):
        import websocket  # websocket-client; imported here so --help works without it

        self.process = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or len(port_file.read_text().split()) < 2:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit(f"check_site: {executable} did not start")
            time.sleep(0.05)
        port, path = port_file.read_text().split()[:2]
        url = f"ws://127.0.0.1:{port}{path}"
        self.socket = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self.next_id, self.events = 0, []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        for domain in ["Page", "Network", "Runtime"]:
            self.call(f"{domain}.enable", session=self.session)

    def call(self, method: str, session: str | None = None, **params) -> dict:
        """Send one command and wait for its answer, keeping the events that arrive meanwhile."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self.socket.send(json.dumps(message))
        while True:
            reply = json.loads(self.socket.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(method)
            self.events.append(json.loads(self.socket.recv()))

    def visit(self, url: str) -> tuple[dict, list[dict]]:
        """Load `url`; the page's report (see INSPECT) and the protocol events it caused."""
        self.events = []
        self.call("Page.navigate", session=self.session, url=url)
        self.wait_for("Page.loadEventFired")
        result = self.call(
            "Runtime.evaluate",
            session=self.session,
            expression=INSPECT,
            awaitPromise=True,
            returnByValue=True,
        )
        return result["result"].get("value", {}), self.events

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(timeout=30)


def _external(url: str) -> bool:
    parsed = urlparse(url)
    if parsed.scheme in LOCAL_SCHEMES:
        return False
    return parsed.hostname not in LOCAL_HOSTS


def problems_of(page: str, report: dict, events: list[dict]) -> list[str]:
    """Everything wrong with one page, one line each."""
    found = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        url = params.get("request", {}).get("url") or params.get("url")
        if method in ("Network.requestWillBeSent", "Network.webSocketCreated") and _external(url):
            found.append(f"external request: {url}")
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            found.append(f"JavaScript error: {text.splitlines()[0]}")
    found += [f"raw TeX: ...{t}..." for t in report.get("rawTex", [])]
    found += [f"MathJax error: {t}" for t in report.get("mathErrors", [])]
    found += [f"backslash in rendered math: {t}" for t in report.get("mathBackslash", [])]
    found += [f"unrendered table: {t}..." for t in report.get("pipeParagraphs", [])]
    images = report.get("images", [])
    found += [f"image does not load: {i['src']}" for i in images if not i["ok"]]
    if page.startswith("notebooks/") and not images:
        found.append("a chapter without a single figure")
    return found


def _serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def pages(html: Path) -> list[str]:
    """Every page of the site, as paths relative to `html`."""
    skip = {"_static", "_sources", "_images", "_downloads"}
    return sorted(
        p.relative_to(html).as_posix()
        for p in html.rglob("*.html")
        if not skip & set(p.relative_to(html).parts)
    )


def find_chromium() -> str | None:
    return next((p for n in ("chromium", "chromium-browser") if (p := shutil.which(n))), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = ROOT / "build" / "site" / "_build" / "html"
    parser.add_argument("html", nargs="?", type=Path, default=default)
    parser.add_argument("--require-browser", action="store_true", help="fail without Chromium")
    args = parser.parse_args()
    executable = find_chromium()
    if executable is None:
        print("check_site: SKIPPED, no Chromium found (Debian: `apt-get install chromium`)")
        return 1 if args.require_browser else 0
    if not (args.html / "intro.html").exists():
        raise SystemExit(f"check_site: no built site in {args.html}: run `make site` first")
    server, port = _serve(args.html)
    failures = 0
    with tempfile.TemporaryDirectory(prefix="check_site_") as profile:
        browser = Browser(executable, Path(profile))
        try:
            for page in pages(args.html):
                report, events = browser.visit(f"http://127.0.0.1:{port}/{page}")
                for problem in problems_of(page, report, events):
                    print(f"{page}: {problem}")
                    failures += 1
        finally:
            browser.close()
            server.shutdown()
    print(f"check_site: {len(pages(args.html))} pages, {failures} problems")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
