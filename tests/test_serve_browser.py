"""`attnflow serve` in headless Chromium against a uvicorn server on 127.0.0.1 started by the test (demo model).

Needs Debian's browser: `apt-get install -y chromium chromium-driver`.  The screenshot goes to
ATTNFLOW_SCREENSHOT (e.g. docs/serve.png) when set, else to a temporary directory.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                       reason="needs Debian's chromium and chromium-driver"),
]

TOKEN = "browser-token-0123456789abcdef"
PAYLOADS = ['<img src=x onerror="window.__pwned=1">', "</script><script>window.__pwned=2</script>",
            '<svg onload="window.__pwned=3"></svg>']


@pytest.fixture(scope="module")
def server():
    import uvicorn

    import attnflow as af
    from attnflow.explorer import bind
    from attnflow.explorer.app import create_app

    model = af.demo.load()
    app = create_app({"demo": lambda: model}, TOKEN)
    sock = bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000",
                f"--user-data-dir={tempfile.mkdtemp(prefix='attnflow-serve-chromium-')}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield d
    d.quit()


@pytest.fixture(autouse=True)
def no_console_errors(driver):
    yield
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []


def wait(driver, cond, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: cond(d))


def by_css(driver, sel):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, sel)


def visible_edges(driver) -> int:
    return int(by_css(driver, "#edge-count")[0].get_attribute("data-visible"))


def open_page(driver, server):
    driver.get(f"{server}/#token={TOKEN}")
    wait(driver, lambda d: by_css(d, "#model option"))


def run_prompt(driver, prompt=None, doc_names=None):
    from selenium.webdriver.common.by import By

    if prompt is not None:
        box = driver.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys(prompt)
    for i, name in enumerate(doc_names or []):
        field = by_css(driver, "#documents .doc-name")[i]
        field.clear()
        field.send_keys(name)
    old = by_css(driver, "#graph")
    driver.find_element(By.ID, "run").click()
    if old:
        wait(driver, lambda d: not old[0].is_displayed() if _alive(old[0]) else True)
    wait(driver, lambda d: by_css(d, "#graph .edge"))
    return int(driver.execute_script("return +document.body.dataset.firstGraphMs"))


def _alive(e):
    try:
        e.is_displayed()
        return True
    except Exception:
        return False


def test_type_a_prompt_run_first_graph(driver, server):
    open_page(driver, server)
    ms = run_prompt(driver, "question : what is the city of alice ?\nanswer :")
    completion = by_css(driver, "#completion .tok")[0].text
    assert completion == "paris"
    assert visible_edges(driver) == len(by_css(driver, "#graph .edge")) > 0
    labels = [t.get_attribute("textContent") for t in by_css(driver, "#graph .tok-label")]
    assert "paris" in labels and "alice" in labels
    assert by_css(driver, "#graph .out-label")[0].get_attribute("textContent") == "\u2192 paris"
    assert ms < 10_000
    assert "sink share" in by_css(driver, "#sink-share")[0].text
    bars = [b.text for b in by_css(driver, "#attribution .bar .name")]
    assert bars[:2] == ["doc1", "doc2"]


def test_tau_slider_changes_edge_count(driver, server):
    from selenium.webdriver.common.keys import Keys

    slider = by_css(driver, "#tau")[0]
    before = visible_edges(driver)
    slider.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)  # tau 0.01 -> 0.05
    wait(driver, lambda d: visible_edges(d) != before)
    assert by_css(driver, "#tau-value")[0].text == "0.05"
    fewer = visible_edges(driver)
    assert fewer < before
    slider.send_keys(Keys.ARROW_LEFT, Keys.ARROW_LEFT, Keys.ARROW_LEFT)  # 0.005
    wait(driver, lambda d: visible_edges(d) > before)


def test_node_click_keeps_paths_through_it(driver, server):
    total = len(by_css(driver, "#graph .edge"))
    nodes = [n for n in by_css(driver, "#graph .node") if n.get_attribute("data-level") == "2"]
    target = max(nodes, key=lambda n: float(n.get_attribute("r")))  # heaviest node of level 2
    driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", target)
    wait(driver, lambda d: by_css(d, "#graph .node.selected"))
    kept = visible_edges(driver)
    dimmed = len(by_css(driver, "#graph .edge.dim"))
    assert 0 < kept < total and kept + dimmed == total
    pos = by_css(driver, "#graph .node.selected")[0].get_attribute("data-pos")
    # every kept edge of layer 1 (level 2 -> level 1) starts at the chosen node
    layer1 = [e for e in by_css(driver, "#graph .edge:not(.dim)") if e.get_attribute("data-layer") == "1"]
    assert layer1 and all(e.get_attribute("data-src") == pos for e in layer1)
    sel = by_css(driver, "#graph .node.selected")[0]
    driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", sel)
    wait(driver, lambda d: visible_edges(d) == total)


def test_head_overlay_and_top_heads(driver, server):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select

    Select(by_css(driver, "#overlay-layer")[0]).select_by_visible_text("L3")
    Select(by_css(driver, "#overlay-head")[0]).select_by_visible_text("H0")
    wait(driver, lambda d: by_css(d, "#graph .head-edge"))
    heads = by_css(driver, "#graph .head-edge")
    assert all(h.get_attribute("data-head") == "0" for h in heads)
    Select(by_css(driver, "#overlay-head")[0]).select_by_visible_text("H5")
    wait(driver, lambda d: all(h.get_attribute("data-head") == "5" for h in by_css(d, "#graph .head-edge")))
    edge = max((e for e in by_css(driver, "#graph .edge") if e.get_attribute("data-layer") == "3"),
               key=lambda e: float(e.get_attribute("data-w")))
    ActionChains(driver).move_to_element(edge).perform()
    wait(driver, lambda d: "top heads" in by_css(d, "#tooltip")[0].get_attribute("textContent"))
    tip = by_css(driver, "#tooltip")[0].get_attribute("textContent")
    assert tip.startswith("layer 3: ") and "weight" in tip
    Select(by_css(driver, "#overlay-layer")[0]).select_by_visible_text("none")
    wait(driver, lambda d: not by_css(d, "#graph .head-edge"))


def test_xss_payloads_in_prompt_and_document_names_stay_inert(driver, server):
    open_page(driver, server)
    run_prompt(driver, " ".join(PAYLOADS) + " question : what is the city of alice ?\nanswer :", doc_names=PAYLOADS[:2])
    assert driver.execute_script("return window.__pwned === undefined")
    assert driver.execute_script("return document.querySelectorAll('img, script:not([src]), iframe').length") == 0
    assert driver.execute_script("return document.querySelectorAll('#graph svg').length") == 0  # no nested svg
    names = [b.get_attribute("textContent") for b in by_css(driver, "#attribution .bar .name")]
    assert names[:2] == PAYLOADS[:2]
    spans = [t.get_attribute("textContent") for t in by_css(driver, "#graph .span-label")]
    assert set(spans) <= set(PAYLOADS[:2]) and spans


def test_screenshot_and_offline_export(driver, server, tmp_path):
    open_page(driver, server)
    run_prompt(driver, "question : what is the city of alice ?\nanswer :")
    out = Path(os.environ.get("ATTNFLOW_SCREENSHOT") or tmp_path / "serve.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(out))
    assert out.stat().st_size > 10_000
    # the export of the run opens offline from file:// with no network request
    run_id = driver.execute_script("return document.querySelector('#graph') && performance.getEntriesByType('resource')"
                                   ".map(e => e.name).filter(n => n.includes('/graph?'))[0]").split("/api/runs/")[1].split("/")[0]
    req = urllib.request.Request(f"{server}/api/runs/{run_id}/export", headers={"X-Attnflow-Token": TOKEN})
    data = urllib.request.urlopen(req, timeout=30).read()
    zipfile.ZipFile(io.BytesIO(data)).extractall(tmp_path)
    index = tmp_path / f"attnflow-run-{run_id}" / "html" / "index.html"
    driver.get_log("performance")  # drop what came before
    driver.get(index.as_uri())
    wait(driver, lambda d: by_css(d, "#app .tok"))
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    assert urls and all(u.startswith("file://") for u in urls), urls
