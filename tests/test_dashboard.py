"""The dashboard in a real headless browser (Debian's chromium + chromium-driver, driven by selenium)."""

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import planting, start_server, stop_server

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `specdb serve` on a store with AdamW (β 1) and Muon (β 0.5) at 4 widths, tail ranks halved."""
    db = tmp_path_factory.mktemp("dash") / "d.duckdb"
    with planting(db) as plant:
        for mult in (1, 2, 4, 8):
            plant(mult=mult, strata={"all": 1.0, "tail": 0.5}, rank_of=lambda D, s, l: D / 4)
            plant(optimizer="muon", mult=mult, strata={"all": 1.0, "tail": 0.5}, ppl=51.0,
                rank_of=lambda D, s, l: 2 * D ** 0.5)
    proc, base = start_server(db)
    yield base
    stop_server(proc)


def traces(browser, kind="points"):
    return browser.execute_script(
        "return (document.getElementById('scaling').data || []).filter(t => t.meta === arguments[0])"
        ".map(t => ({name: t.name, y: Array.from(t.y)}));", kind)


def test_the_dashboard_loads_draws_and_reacts(server, browser, tmp_path):
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(server + "/")
    assert browser.execute_async_script("window.specdbReady.then(arguments[arguments.length - 1]);") is True
    # the main figure: one point trace per optimizer, β of `query beta` in the legend, a fit each
    tail = traces(browser)
    assert [t["name"].split(":")[0] for t in tail] == ["AdamW", "Muon"]
    assert "β=1.00" in tail[0]["name"] and "β=0.50" in tail[1]["name"]
    assert len(traces(browser, "fit")) == 2 and len(traces(browser, "band")) == 4
    # switching the stratum redraws the figure with that stratum's points (tail ranks are halved)
    Select(browser.find_element("id", "stratum")).select_by_visible_text("all")
    WebDriverWait(browser, 30).until(lambda b: traces(b)[0]["y"] != tail[0]["y"])
    assert traces(browser)[0]["y"] == pytest.approx([2 * y for y in tail[0]["y"]], rel=1e-6)
    # the tables and the run page
    assert "AdamW" in browser.find_element("id", "betas").text and "Muon" in browser.find_element("id", "betas").text
    assert "matched pair" in browser.find_element("id", "matched").text
    browser.find_element("css selector", "#runs td.link").click()
    WebDriverWait(browser, 30).until(lambda b: b.execute_script(
        "return (document.getElementById('run-spectrum').data || []).length") == 1)
    assert browser.execute_script("return document.getElementById('run-loss').data.length") == 2
    # everything the page loads comes from specdb itself, and nothing went wrong in the console
    sources = browser.execute_script("return Array.from(document.scripts).map(s => s.src).filter(Boolean)")
    assert sources and all(s.startswith(server) for s in sources)
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    shot = tmp_path / "dashboard.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:4] == b"\x89PNG"
    if os.environ.get("SPECDB_WRITE_SCREENSHOT"):  # refresh the README's picture deliberately
        shutil.copy(shot, ROOT / "docs" / "dashboard.png")


HOSTILE_LABEL = '<img src=x onerror="window.__xss=1">'


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory):
    """A real `specdb serve` whose store holds an optimizer label written to run script, under a
    memory cap (the cross-origin attack below aims at it)."""
    db = tmp_path_factory.mktemp("xss") / "x.duckdb"
    with planting(db) as plant:
        for mult in (1, 2, 4):
            plant(optimizer={"name": "adamw", "label": HOSTILE_LABEL}, mult=mult, strata={"all": 1.0, "tail": 0.5},
                rank_of=lambda D, s, l: D / 4)
            plant(optimizer="muon", mult=mult, ppl=50.5, strata={"all": 1.0, "tail": 0.5},
                rank_of=lambda D, s, l: 2 * D ** 0.5)
    import resource

    def outer():
        resource.setrlimit(resource.RLIMIT_AS, (6 * 1024**3, 6 * 1024**3))

    proc, base = start_server(db, env={"SPECDB_PROCESS_MEMORY_MB": "1536", "SPECDB_READ_TIME_S": "5"}, preexec_fn=outer)
    yield base, db
    stop_server(proc)


def test_stored_labels_are_shown_as_text_never_run(hostile_server, browser):
    base, _ = hostile_server
    browser.get(base + "/")
    assert browser.execute_async_script("window.specdbReady.then(arguments[arguments.length - 1]);") is True
    time.sleep(0.5)
    assert browser.execute_script("return window.__xss") is None
    for table in ("betas", "runs"):
        assert HOSTILE_LABEL in browser.find_element("id", table).text, table
    assert not browser.find_elements("css selector", "#betas img, #runs img, #matched img")


def test_a_page_on_another_origin_cannot_take_the_server_down(hostile_server, browser, tmp_path):
    """One <img> on a foreign page used to kill the loopback server with an unbounded predicate."""
    import urllib.parse

    base, _ = hostile_server
    where = urllib.parse.quote("length(repeat(run_id, 100000000)) > 0")
    page = tmp_path / "attacker.html"
    page.write_text(f'<html><body><img id="a" src="{base}/api/beta?where={where}">'
                    f'<img id="b" src="{base}/api/dynamics?where={where}"></body></html>')
    browser.get(page.as_uri())
    time.sleep(8)  # the requests run to their bound
    status = json.loads(urllib.request.urlopen(f"{base}/api/status", timeout=10).read())
    assert status["runs"] == {"done": 6}


def test_the_api_docs_render_offline(server, browser):
    browser.get(server + "/docs")
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(lambda b: b.find_elements("css selector", ".opblock"))
    assert "/api/beta" in browser.find_element("id", "swagger-ui").text
    sources = browser.execute_script("return Array.from(document.scripts).map(s => s.src).filter(Boolean)")
    assert sources and all(s.startswith(server) for s in sources)
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
