"""Headless Chromium for the UI tests: open a page, wait for text, save screenshots.

    from browser import browser_missing, open_page, screenshot, wait_for_text
    if reason := browser_missing():
        pytest.skip(reason)
    with open_page("http://127.0.0.1:5000/") as driver:      # or a local file: open_page(tmp_path / "report.html")
        wait_for_text(driver, "Experiments", timeout=60)
        screenshot(driver, artifacts_dir / "page.png")

The system Chromium and chromedriver are used directly (never Selenium Manager, which would go online).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("RPSFT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("RPSFT_CHROMEDRIVER", "/usr/bin/chromedriver")
WINDOW = (1600, 1000)


def browser_missing() -> str | None:
    """Why headless Chromium cannot run here (``None`` when it can): for ``pytest.skip``."""
    for label, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)):
        if not (Path(path).is_file() and os.access(path, os.X_OK)):
            return f"{label} is not installed at {path} (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install 'selenium>=4.20', in the dev extra)"
    return None


def artifacts_dir(default: Path) -> Path:
    """Where tests put screenshots: ``$RPSFT_TEST_ARTIFACTS`` when set, else ``default`` (e.g. ``tmp_path``)."""
    path = Path(os.environ.get("RPSFT_TEST_ARTIFACTS") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


def start_driver(width: int = WINDOW[0], height: int = WINDOW[1]) -> Any:
    """A headless Chromium WebDriver (the caller quits it)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        "--force-device-scale-factor=1",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--lang=en-US",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    return driver


@contextmanager
def open_page(url_or_path: str | Path, width: int = WINDOW[0], height: int = WINDOW[1]) -> Iterator[Any]:
    """A headless Chromium showing ``url_or_path`` (an http(s)/file URL or a local file path); quit on exit."""
    target = str(url_or_path)
    if "://" not in target:
        target = Path(target).resolve().as_uri()
    driver = start_driver(width, height)
    try:
        driver.get(target)
        yield driver
    finally:
        driver.quit()


def page_text(driver: Any) -> str:
    """The visible text of the page (``document.body.innerText``)."""
    return driver.execute_script("return document.body ? document.body.innerText : '';") or ""


def wait_for_text(driver: Any, text: str | list[str], timeout: float = 60.0) -> str:
    """Wait until every ``text`` shows in the page's visible text; returns that text.

    On timeout: ``TimeoutError`` naming the missing strings, with the start of the page text.
    """
    wanted = [text] if isinstance(text, str) else list(text)
    deadline = time.monotonic() + timeout
    while True:
        body = page_text(driver)
        missing = [t for t in wanted if t not in body]
        if not missing:
            return body
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"after {timeout:g}s the page ({driver.current_url}) does not show {missing!r}; "
                f"it shows: {body[:1500]!r}"
            )
        time.sleep(0.5)


def screenshot(driver: Any, path: str | Path) -> Path:
    """Save a PNG of the current viewport to ``path`` (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(path)):
        raise OSError(f"screenshot: Chromium could not write {path}")
    return path


def check_png(path: str | Path, min_bytes: int = 10_000) -> tuple[int, int]:
    """Assert ``path`` is a real screenshot: a PNG over ``min_bytes`` that is not one flat colour; its size."""
    from PIL import Image

    path = Path(path)
    assert path.is_file(), f"no screenshot at {path}"
    assert path.stat().st_size > min_bytes, f"{path} is only {path.stat().st_size} bytes"
    with Image.open(path) as image:
        assert image.format == "PNG", f"{path} is {image.format}, not PNG"
        rgb = image.convert("RGB")
        low, high = zip(*rgb.getextrema())
        assert low != high, f"{path} is a single flat colour {low}"
        colours = rgb.getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 8, f"{path} has only {len(colours)} colours"
        return rgb.size
