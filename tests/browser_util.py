"""Headless Debian Chromium for the viewer's tests and screenshots: `driver()`, `wait_ready`, `screenshot`.

    >>> from browser_util import screenshot
    >>> screenshot("view/", "docs/viewer.png", hover=17, mode="flow", freeze=True)   # doctest: +SKIP

Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (`apt-get install -y chromium chromium-driver`).
Nothing here contacts the network: the flags below turn Chromium's own background traffic off.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)


def available() -> bool:
    return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


def driver(width: int = 1400, height: int = 1000, logs: bool = True) -> webdriver.Chrome:
    """A headless Chromium with a fresh profile; browser and network logs kept when `logs`."""
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in (*FLAGS, f"--window-size={width},{height}", f"--user-data-dir={tempfile.mkdtemp(prefix='attnflow-chromium-')}"):
        opts.add_argument(arg)
    if logs:
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)  # explicit driver: selenium-manager stays idle
    d.set_script_timeout(20)
    return d


def wait_ready(d, timeout: float = 10) -> None:
    WebDriverWait(d, timeout, poll_frequency=0.02).until(
        lambda d: d.execute_script("return document.getElementById('app').dataset.state") == "ready"
    )


def set_mode(d, mode: str) -> None:
    """Show the Observer / Observed / Flow view in the token pane (clicks its tab when another is shown)."""
    if d.execute_script("return document.getElementById('app').dataset.mode") != mode:
        d.find_element(By.ID, mode).click()


def token(d, pos: int):
    return d.find_element(By.CSS_SELECTOR, f'#tokens .tok[data-pos="{pos}"]')


def hover(d, mode: str, pos: int):
    """Hover token `pos` in view `mode`."""
    set_mode(d, mode)
    tok = token(d, pos)
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", tok)
    ActionChains(d).move_to_element(d.find_element(By.TAG_NAME, "h1")).move_to_element(tok).perform()
    return tok


_hover = hover  # `screenshot` has a parameter of that name


def double_click(d, mode: str, pos: int) -> None:
    set_mode(d, mode)
    tok = token(d, pos)
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", tok)
    ActionChains(d).double_click(tok).perform()


def screenshot(view_dir, png_path, hover: int | None = None, mode: str = "flow", freeze: bool = True,
               layer: int | None = None, head: int | None = None, size=(1500, 900), d=None) -> Path:
    """Open `view_dir/index.html`, optionally pick a layer index and head, focus token `hover` in `mode`
    (frozen when `freeze`), and save a PNG to `png_path`.  Uses `d` when given, else its own browser."""
    own = d is None
    d = d or driver(*size, logs=False)
    try:
        d.set_window_size(*size)
        d.get((Path(view_dir).resolve() / "index.html").as_uri())
        wait_ready(d)
        if layer is not None or head is not None:
            d.execute_script(
                "const l = document.getElementById('layer'); if (arguments[0] !== null) {"
                " l.value = String(arguments[0]); l.dispatchEvent(new Event('change')); }", layer)
            wait_ready(d)
            if head is not None:
                d.find_element(By.CSS_SELECTOR, f'button.head[data-head="{head}"]').click()
                wait_ready(d)
        if hover is not None:
            double_click(d, mode, hover) if freeze else _hover(d, mode, hover)
        WebDriverWait(d, 10).until(lambda d: d.execute_script("return document.getElementById('headgrid').dataset.drawn") == "true")
        if freeze:
            ActionChains(d).move_to_element(d.find_element(By.TAG_NAME, "h1")).perform()
        png = Path(png_path)
        png.parent.mkdir(parents=True, exist_ok=True)
        assert d.save_screenshot(str(png))
        return png
    finally:
        if own:
            d.quit()
