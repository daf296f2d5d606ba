"""The portal in a real browser: subscriber s1 of the lab runs out of money,
headless Chromium in s1's namespace asks the upstream for a page and gets
the block page (511, with the reason), follows its link to the portal on the
gateway, logs in, sees the balance the ledger has, activates a prepaid card,
and the next page request reaches the upstream again.

Chromium is driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: NUL-terminated JSON on fds 3 and 4), so no
websocket client or browser download is needed: only Debian's ``chromium``.

Screenshots of the block page and of the portal go to the test's tmp_path;
with ``TOLLGATE_SCREENSHOTS=DIR`` they are copied to DIR as well
(``TOLLGATE_SCREENSHOTS=docs`` refreshes ``docs/block-page.png`` and
``docs/portal.png``).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
from lablib import REPO, TOLLGATE, Gateway, lab_config, netns

from accounting.money import format_amount, parse_amount

UP4 = "198.18.0.2"
PASSWORD = "lab portal password"
CARD_VALUE = "1.00"
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.fail("chromium is not installed: `apt-get install chromium` (it belongs in the Makefile's APT_PACKAGES)",
                pytrace=False)

WIDTH, HEIGHT = 1000, 1200
FLAGS = ["--headless", "--no-sandbox",  # root in a namespace: Chromium's sandbox needs a user namespace of its own
         "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
         "--no-proxy-server", "--hide-scrollbars", "--mute-audio", f"--window-size={WIDTH},{HEIGHT}",
         # plain http to an address, as a subscriber's browser after the kernel's redirect: no https first
         "--disable-features=HttpsUpgrades,Translate,MediaRouter,OptimizationHints",
         "--remote-debugging-pipe"]


class Chromium:
    """Headless Chromium in network namespace ``ns``, one page, driven by CDP over a pipe."""

    def __init__(self, ns: str, profile: Path, log: Path) -> None:
        # the shell hands our pipes to Chromium as fds 3 (commands in) and 4 (replies and events out)
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "sh", "-c", 'exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null', CHROMIUM,
             *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "w"), start_new_session=True)
        self.cond = threading.Condition()
        self.replies: dict[int, dict] = {}
        self.events: list[dict] = []
        self.closed = False
        self.last_id = 0
        threading.Thread(target=self._read, daemon=True).start()
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})["sessionId"]
        self.page("Page.enable")
        self.page("Network.enable")
        self.page("Emulation.setDeviceMetricsOverride", {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1,
                                                         "mobile": False})

    def _read(self) -> None:
        buffered = b""
        while chunk := self.proc.stdout.read1(1 << 16):
            *messages, buffered = (buffered + chunk).split(b"\0")
            with self.cond:
                for raw in messages:
                    msg = json.loads(raw)
                    if "id" in msg:
                        self.replies[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 20) -> dict:
        with self.cond:
            self.last_id += 1
            n = self.last_id
        msg = {"id": n, "method": method, "params": params or {}, **({"sessionId": session} if session else {})}
        self.proc.stdin.write(json.dumps(msg).encode() + b"\0")
        self.proc.stdin.flush()
        with self.cond:
            if not self.cond.wait_for(lambda: n in self.replies or self.closed, timeout) or n not in self.replies:
                raise AssertionError(f"chromium: no answer to {method}")
            reply = self.replies.pop(n)
        if "error" in reply:
            raise AssertionError(f"chromium: {method}: {reply['error']}")
        return reply["result"]

    def page(self, method: str, params: dict | None = None, timeout: float = 20) -> dict:
        return self.call(method, params, self.session, timeout)

    def load(self, start_navigation, timeout: float = 15) -> dict:
        """Start a navigation and wait for the page's load event; the main document's response
        (``url``, ``status``, ...; after redirects, the last one)."""
        with self.cond:
            first = len(self.events)
        start_navigation()
        with self.cond:
            if not self.cond.wait_for(lambda: any(e["method"] == "Page.loadEventFired" for e in self.events[first:]),
                                      timeout):
                raise AssertionError("chromium: the page did not load")
            documents = [e["params"]["response"] for e in self.events[first:]
                         if e["method"] == "Network.responseReceived" and e["params"].get("type") == "Document"]
        assert documents, "no document was received (a network error page?)"
        return documents[-1]

    def goto(self, url: str) -> dict:
        def navigate():
            result = self.page("Page.navigate", {"url": url})
            assert "errorText" not in result, f"{url}: {result['errorText']}"

        return self.load(navigate)

    def js(self, expression: str):
        result = self.page("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def text(self, selector: str = "body") -> str:
        return self.js(f"document.querySelector({json.dumps(selector)}).innerText")

    def fill(self, selector: str, value: str) -> None:
        self.js(f"document.querySelector({json.dumps(selector)}).value = {json.dumps(value)}")

    def click(self, selector: str) -> dict:
        """Click what starts a navigation (a link, a submit button); the document it leads to."""
        return self.load(lambda: self.js(f"document.querySelector({json.dumps(selector)}).click()"))

    def screenshot(self, path: Path) -> None:
        height = math.ceil(self.js("document.body.getBoundingClientRect().bottom")) + 32  # the content only
        shot = self.page("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                    "clip": {"x": 0, "y": 0, "width": WIDTH,
                                                             "height": max(300, min(height, 3000)), "scale": 1}})
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own session only (start_new_session)
            self.proc.wait()


def ledger_state(db: Path, name: str = "s1") -> tuple[int, str | None, str | None]:
    """(balance in internal units, the last block record's kind and reason) of a subscriber."""
    con = sqlite3.connect(db)
    try:
        sid, balance = con.execute("SELECT id, balance FROM subscribers WHERE name = ?", (name,)).fetchone()
        last = con.execute("SELECT kind, reason FROM blocks WHERE subscriber_id = ? ORDER BY id DESC LIMIT 1",
                           (sid,)).fetchone()
        return balance, *(last or (None, None))
    finally:
        con.close()


def wait_for(what: str, check, timeout: float = 10, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(every)
    return result


def save(shot: Path) -> None:
    folder = os.environ.get("TOLLGATE_SCREENSHOTS")
    if folder:
        target = Path(folder) if Path(folder).is_absolute() else REPO / folder
        shutil.copyfile(shot, target / shot.name)
        print(f"  saved {target / shot.name}")


def test_a_blocked_subscriber_tops_up_in_the_portal(lab, tmp_path):
    gw = Gateway(lab.gw, tmp_path, lab_config(2, {1: "0.01"})).start()
    browser = None
    try:
        # the operator's part: a portal password for s1 (from stdin) and a prepaid card
        done = subprocess.run([*TOLLGATE, "subscriber", "password", "s1", "-c", str(gw.config), "--db", str(gw.db)],
                              input=PASSWORD + "\n", cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        expires = (dt.date.today() + dt.timedelta(days=30)).isoformat()
        cards = gw.tollgate("cards", "generate", "--count", "1", "--value", CARD_VALUE, "--expires", expires)
        assert cards.returncode == 0, cards.stderr
        serial, code = cards.stdout.strip().splitlines()[-1].split(",")

        # 0.01 EUR at 0.01 EUR a MB: s1 is blocked within its first megabyte
        netns(lab.sub(1), "curl", "-s", "-m", "10", "-o", "/dev/null", f"http://{UP4}/big.bin")
        wait_for("s1's block in the ledger", lambda: ledger_state(gw.db)[1] == "block")
        # the ledger's balance settles a flush after the last byte: the live one must show the same
        previous = None
        while (current := ledger_state(gw.db)[0]) != previous:
            previous = current
            time.sleep(1.2)
        balance = current

        browser = Chromium(lab.sub(1), tmp_path / "profile", tmp_path / "chromium.log")
        doc = browser.goto(f"http://{UP4}/")
        page = browser.text()
        print(f"\n  block page: {doc['status']} for {doc['url']}")
        assert doc["status"] == 511 and doc["url"] == f"http://{UP4}/"
        assert "Internet access paused" in page and "Your balance has run out" in page
        assert "Log in to your account to top up" in page
        browser.screenshot(tmp_path / "block-page.png")
        save(tmp_path / "block-page.png")

        login_url = f"http://{lab.gw_addr4(1)}:8080/portal/login"
        assert browser.js("document.querySelector('#portal-login').href") == login_url
        doc = browser.click("#portal-login")
        assert (doc["status"], doc["url"]) == (200, login_url)
        browser.fill("#login", "s1")
        browser.fill("#password", "not " + PASSWORD)
        doc = browser.click("#submit")
        assert doc["status"] == 401 and "Login failed" in browser.text()
        browser.fill("#password", PASSWORD)
        doc = browser.click("#submit")
        assert (doc["status"], doc["url"]) == (200, f"http://{lab.gw_addr4(1)}:8080/portal")
        shown = browser.text("#balance")
        print(f"  portal: balance shown {shown}, ledger {format_amount(balance, 'EUR')}")
        assert shown == format_amount(balance, "EUR")
        assert "paused" in browser.text("#status")

        browser.fill("#code", code)
        activated = time.monotonic()
        doc = browser.click("#activate")
        assert doc["status"] == 200 and f"Card {serial} activated" in browser.text("#flash")
        after = ledger_state(gw.db)[0]
        assert after == balance + parse_amount(CARD_VALUE, "EUR")
        con = sqlite3.connect(gw.db)
        actors = [a for (a,) in con.execute("SELECT actor FROM audit_log WHERE action = 'card.activate'")]
        con.close()
        assert actors == ["portal:1"]

        # the same browser, the same URL: the upstream's own page now
        def upstream_reached():
            answer = browser.goto(f"http://{UP4}/")
            return answer["status"] == 200 and browser.text().strip() == "upstream"

        wait_for("the upstream's page", upstream_reached, timeout=5, every=0.2)
        print(f"  the upstream's index page {time.monotonic() - activated:.2f} s after the card was activated")

        doc = browser.goto(doc["url"])  # the portal again, with the card's message, once access is back
        assert "Internet access is on" in browser.text("#status")
        assert f"prepaid card {serial}" in browser.text("#payments")
        browser.screenshot(tmp_path / "portal.png")
        save(tmp_path / "portal.png")
    finally:
        if browser is not None:
            browser.close()
        gw.stop()
