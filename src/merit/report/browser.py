"""Render report.html in a headless Chromium (when one is installed): a screenshot for the docs, and a
check that the page's pictures really decode (not only that the file exists)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "chrome")
# Injected into a copy of the page: records, once loaded, each picture's decoded width.
_PROBE = ("<script>window.addEventListener('load',()=>{document.body.setAttribute('data-images',"
          "[...document.images].map(i=>i.naturalWidth).join(','));});</script>")


def find_browser() -> str | None:
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def _run(browser: str, *args: str, timeout: float = 60) -> str:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout


def image_widths(page: Path, browser: str | None = None) -> list[int]:
    """The decoded width of every picture of ``page`` as the browser rendered it (0: did not decode)."""
    browser = browser or find_browser()
    if browser is None:
        raise RuntimeError("no headless Chromium found (install chromium or chromium-headless-shell)")
    text = Path(page).read_text()
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "page.html"
        probe.write_text(text.replace("</body>", _PROBE + "</body>"))
        dom = _run(browser, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    found = re.search(r'data-images="([0-9,]*)"', dom)
    if found is None:
        raise RuntimeError("the page did not finish loading in the browser")
    return [int(x) for x in found.group(1).split(",") if x]


def screenshot(page: Path, out: Path, width: int = 1200, height: int = 2400, browser: str | None = None) -> Path:
    browser = browser or find_browser()
    if browser is None:
        raise RuntimeError("no headless Chromium found (install chromium or chromium-headless-shell)")
    _run(browser, f"--window-size={width},{height}", f"--screenshot={Path(out).absolute()}", Path(page).absolute().as_uri())
    return Path(out)
