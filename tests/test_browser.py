"""The report opens in Debian's headless Chromium: no console errors, the headline table visible, and the page
fits a 1400 px wide window without horizontal scrolling.

Chromium is driven over the DevTools protocol (tornado's websocket client, already in the stack through
ipykernel); every wait is bounded. `.ci/run` installs Chromium when it is missing.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from test_report import build_report, contract_summary, load_config, make_results, render_contract

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason="Debian's chromium is not installed (/usr/bin/chromium); "
                              "install it with `apt-get install chromium` (.ci/run does)"),
]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync", "--window-size=1400,1000"]
TIMEOUT_S = 60

# Evaluated in the page after load: where the headline table is and whether it can be seen.
PROBE = """(() => {
  const t = document.getElementById('headline');
  if (!t) return JSON.stringify({found: false});
  const firstTable = document.querySelector('table') === t;
  t.scrollIntoView({block: 'start'});
  const r = t.getBoundingClientRect(), s = getComputedStyle(t);
  const bottom = Math.min(r.bottom, window.innerHeight), right = Math.min(r.right, window.innerWidth);
  const middle = document.elementFromPoint((Math.max(r.left, 0) + right) / 2, (Math.max(r.top, 0) + bottom) / 2);
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length;
  return JSON.stringify({found: true, first_table: firstTable, width: r.width, height: r.height, top: r.top,
    viewport: window.innerHeight, covered: !(middle && t.contains(middle)), display: s.display,
    visibility: s.visibility, opacity: s.opacity,
    rows: t.tBodies[0].rows.length, images: document.images.length, broken_images: broken,
    page_width: document.documentElement.scrollWidth, window_width: document.documentElement.clientWidth});
})()"""


async def _inspect(ws_url: str, page_url: str) -> tuple[list[str], dict]:
    """Load page_url in the tab behind ws_url; return (console/exception/log errors, PROBE result)."""
    from tornado.websocket import websocket_connect

    conn = await websocket_connect(ws_url)
    errors: list[str] = []
    events: list[dict] = []
    next_id = 0

    async def call(method: str, params: dict | None = None) -> dict:
        nonlocal next_id
        next_id += 1
        conn.write_message(json.dumps({"id": next_id, "method": method, "params": params or {}}))
        while True:
            msg = await conn.read_message()
            if msg is None:
                raise RuntimeError("Chromium closed the DevTools connection")
            msg = json.loads(msg)
            if msg.get("id") == next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            events.append(msg)

    for domain in ("Runtime", "Log", "Page"):
        await call(f"{domain}.enable")
    await call("Page.navigate", {"url": page_url})
    while not any(e.get("method") == "Page.loadEventFired" for e in events):
        msg = await conn.read_message()
        if msg is None:
            raise RuntimeError("Chromium closed the DevTools connection while loading")
        events.append(json.loads(msg))
    await asyncio.sleep(0.5)  # late console messages
    evaluated = await call("Runtime.evaluate", {"expression": PROBE, "returnByValue": True})
    probe = json.loads(evaluated["result"]["value"])
    conn.close()
    for e in events:
        p = e.get("params", {})
        if e.get("method") == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
            errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
        elif e.get("method") == "Runtime.exceptionThrown":
            errors.append("exception: " + p["exceptionDetails"].get("text", "") + " "
                          + str(p["exceptionDetails"].get("exception", {}).get("description", "")))
        elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
            errors.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
    return errors, probe


def open_in_chromium(page: Path, profile: Path) -> tuple[list[str], dict]:
    """Open a local page in a fresh headless Chromium; return its errors and the headline probe."""
    proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + TIMEOUT_S
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Chromium did not start its DevTools endpoint (exit code {proc.poll()})")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            tab = next(t for t in json.load(r) if t["type"] == "page")
        return asyncio.run(asyncio.wait_for(_inspect(tab["webSocketDebuggerUrl"], page.resolve().as_uri()),
                                            TIMEOUT_S))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_report_opens_without_errors_and_shows_the_headline(tmp_path):
    config = load_config("demo/config.yaml", tmp_path)
    make_results(config)
    page, html = build_report(tmp_path, config)
    errors, probe = open_in_chromium(page, tmp_path / "profile")
    assert errors == []
    assert probe["found"], "no element with id 'headline'"
    assert probe["width"] > 0 and probe["height"] > 0
    assert probe["display"] != "none" and probe["visibility"] == "visible" and float(probe["opacity"]) > 0
    assert probe["first_table"], "the headline table is not the page's first table"
    assert -1 < probe["top"] < probe["viewport"] and not probe["covered"], f"not visible once scrolled to: {probe}"
    assert probe["rows"] == html.split('id="headline"')[1].split("</table>")[0].split("<tbody>")[1].count("<tr")
    assert probe["images"] >= 3 and probe["broken_images"] == 0
    assert probe["page_width"] <= probe["window_width"], "the page scrolls horizontally in a 1400 px window"


def test_the_study_shaped_report_fits_1400_px(tmp_path):
    """The study's tables (Table 3, per dataset, as released, each final run, every reference, selection bias)
    on a summary.json of the aggregate's contract: no horizontal scrolling in a 1400 px window."""
    page = tmp_path / "report" / "index.html"
    render_contract(tmp_path, contract_summary())
    errors, probe = open_in_chromium(page, tmp_path / "profile")
    assert errors == [] and probe["found"] and probe["rows"] == 3
    assert 0 < probe["window_width"] <= 1400
    assert probe["page_width"] <= probe["window_width"], "the page scrolls horizontally in a 1400 px window"


def test_the_check_sees_errors(tmp_path):
    """Negative control: a page with a console error, an exception and a missing image is caught, and a
    headline table after another table and under an overlay is seen as such."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><table><tbody><tr><td>first</td></tr></tbody></table>"
                   "<table id='headline'><tbody><tr><td>headline</td></tr></tbody></table><img src='missing.png'>"
                   "<div style='position: fixed; inset: 0; background: white'></div>"
                   "<script>console.error('boom'); undefined_function();</script></body></html>")
    errors, probe = open_in_chromium(bad, tmp_path / "profile")
    assert probe["found"] and not probe["first_table"] and probe["covered"]
    text = "\n".join(errors)
    assert "boom" in text and "undefined_function" in text and "missing.png" in text
