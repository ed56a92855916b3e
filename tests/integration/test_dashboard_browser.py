"""The dashboard in a real browser (headless Chromium driven by Selenium) against a real local
stack with HTTP traffic and HSMS tools: the right Active version, a CLI switch shown within 2 s
without a reload, a switch from the page refused without the admin token and done with it, the
CLI's own refusal shown in the page, and a screenshot kept (pytest's tmp dir and
.artifacts/dashboard.png). Chromium comes from `make browser` (Debian chromium and
chromium-driver); the test skips only when they are not installed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from ..helpers import ROOT
from .test_local_stack import zd

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1440,1400",
)  # fmt: skip
APP = "drimeap"


def _browser_binaries() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip(
            "headless Chromium is not installed and could not be installed here "
            "('make browser' installs the Debian packages chromium and chromium-driver)"
        )
    return chromium, driver


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    chromium, chromedriver = _browser_binaries()
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (test extra)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    service = Service(executable_path=chromedriver, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def hsms_stack(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "state"
    r = zd(state, "up", "--http-listen", "127.0.0.1:0", "--hsms-listen", "127.0.0.1:0",
           "--admin-listen", "127.0.0.1:0")  # fmt: skip
    assert r.returncode == 0, r.stderr
    yield state
    if (state / "stack.json").exists():
        zd(state, "down")


class Traffic:
    """HTTP requests through the proxy (about 20/s) and two simulated tools over HSMS, so that
    the charts and the session table have something to show. Bounded: stopped by the test, and
    the request loop ends by itself after MAX_S."""

    MAX_S = 600.0

    def __init__(self, http_port: int, hsms_port: int, logs: Path) -> None:
        self.url = f"http://127.0.0.1:{http_port}/"
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.sim = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "hsms-sim", "--target",
             f"127.0.0.1:{hsms_port}", "--tools", "2", "--rate", "2", "--seconds", "300"],
            stdout=open(logs / "hsms-sim.log", "wb"), stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.MAX_S
        while not self.stop_flag.is_set() and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    r.read()
            except OSError:
                pass  # the charts show errors; the test does not count them
            self.stop_flag.wait(0.05)

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(10)
        self.sim.send_signal(signal.SIGTERM)
        try:
            self.sim.wait(10)
        except subprocess.TimeoutExpired:
            self.sim.kill()
            self.sim.wait(5)


def _wait(driver, cond, timeout: float, what: str):  # type: ignore[no-untyped-def]
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    def check(d):  # type: ignore[no-untyped-def]
        try:
            return cond(d)
        except (StaleElementReferenceException, WebDriverException):
            return False  # the page re-renders every second: look again

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(check)
    except Exception as exc:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from exc


def _text(driver, element_id: str) -> str:  # type: ignore[no-untyped-def]
    """The element's text as shown, read in one step (the page re-renders every second, so
    an element found first and read later may be gone)."""
    return driver.execute_script(
        "const e = document.getElementById(arguments[0]); return e ? e.innerText : null;",
        element_id,
    )


def _click(driver, element_id: str) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    _wait(driver, lambda d: d.find_element(By.ID, element_id).click() or True, 10,
          f"#{element_id} to be clickable")  # fmt: skip


def _confirm(driver, accept: bool = True) -> str:  # type: ignore[no-untyped-def]
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    alert = WebDriverWait(driver, 10).until(ec.alert_is_present())
    question = alert.text
    alert.accept() if accept else alert.dismiss()
    return question


def _unlock(driver, token: str) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    if driver.find_element(By.ID, "lock").is_displayed():
        _click(driver, "lock")
    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    _click(driver, "unlock")
    _wait(driver, lambda d: d.find_element(By.ID, f"switch-{APP}").is_displayed(), 10,
          "the switch button after the token was entered")  # fmt: skip


def _message(driver, kind: str, timeout: float = 60) -> str:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    def done(d):  # type: ignore[no-untyped-def]
        m = d.find_element(By.ID, "message")
        return m.text if m.get_attribute("data-kind") == kind and "running" not in m.text else None

    return _wait(driver, done, timeout, f"a {kind} message in the page")


def _history(state: Path) -> list[dict]:
    return [orjson.loads(x) for x in (state / "history.jsonl").read_bytes().splitlines()]


def _active(driver) -> str:  # type: ignore[no-untyped-def]
    return _text(driver, f"active-version-{APP}")


def test_dashboard_in_a_real_browser(browser, hsms_stack: Path, tmp_path: Path) -> None:
    driver = browser
    state = hsms_stack
    stack = orjson.loads((state / "stack.json").read_bytes())
    proxy = stack["proxy"]
    traffic = Traffic(proxy["http"], proxy["hsms"], tmp_path)
    try:
        driver.get(f"http://{proxy['admin_addr']}/")
        _wait(driver, lambda d: _active(d) == "v1", 30, "Active version v1 in the page")
        assert _text(driver, f"active-group-{APP}") == "blue group"
        assert _text(driver, f"standby-group-{APP}") == "green group"
        assert _text(driver, "mode") == "READ-ONLY"
        assert not driver.find_elements("id", f"switch-{APP}")  # read-only: no buttons
        _wait(driver, lambda d: "(2)" in _text(d, "hsms-count"), 60, "two HSMS tool sessions")

        # Without the token the page cannot act: the same POST it would send is refused.
        refused = driver.execute_async_script(
            """const done = arguments[arguments.length - 1];
            fetch('/v1/dashboard/switch', {method: 'POST', headers: {'Content-Type':
              'application/json'}, body: JSON.stringify({app: 'drimeap'})})
              .then(r => r.json().then(b => done([r.status, b.error])));"""
        )
        assert refused == [401, "switch needs the admin token (Authorization: Bearer)"]

        r = zd(state, "deploy", "v2", timeout=180)
        assert r.returncode == 0, r.stderr
        _wait(driver, lambda d: _text(d, f"standby-version-{APP}") == "v2", 10, "Standby v2")
        driver.execute_script("window.__zerodownNoReload = 'still here';")
        r = zd(state, "switch")
        assert r.returncode == 0, r.stderr
        switched = time.monotonic()
        _wait(driver, lambda d: _active(d) == "v2", 2.0, "Active v2 within 2 s of the switch")
        shown_after = time.monotonic() - switched
        assert driver.execute_script("return window.__zerodownNoReload") == "still here"
        assert shown_after <= 2.0

        # A wrong token: the buttons appear, the switch is refused and nothing changes.
        _unlock(driver, "not-the-token")
        _click(driver, f"switch-{APP}")
        assert _confirm(driver) == "switch drimeap from v2 (green) to v1 (blue)?"
        assert "needs the admin token" in _message(driver, "bad")
        assert _active(driver) == "v2"

        # The token: the switch is done by `zerodown switch` and audited as coming from here.
        _unlock(driver, stack["token"])
        _click(driver, f"switch-{APP}")
        assert _confirm(driver) == "switch drimeap from v2 (green) to v1 (blue)?"
        assert "switched drimeap to blue (v1)" in _message(driver, "ok")
        _wait(driver, lambda d: _active(d) == "v1", 10, "Active v1 after the page's switch")
        last = _history(state)[-1]
        assert (last["action"], last["result"], last["to"]) == ("switch", "ok", "blue")
        assert last["via"] == "dashboard (client 127.0.0.1)"
        _wait(driver, lambda d: "dashboard (client 127.0.0.1)" in d.page_source, 15,
              "the page's switch in the release history")  # fmt: skip
        _wait(driver, lambda d: len(d.find_elements("css selector", ".legend .swatch")) == 2
              and d.find_elements("css selector", ".switch-mark"), 15,
              "both versions and the switches on the charts")  # fmt: skip
        back_at = last["time_ns"] / 1e9
        _wait(driver, lambda d: d.execute_script(
            "const p = (state.points.drimeap || {}).v1 || []; return p.length && p.at(-1)[0];"
        ) >= back_at + 3, 20, "v1's traffic on the charts after the page's switch")  # fmt: skip
        shot = tmp_path / "dashboard.png"
        assert driver.save_screenshot(str(shot))
        artifacts = ROOT / ".artifacts"
        artifacts.mkdir(exist_ok=True)
        shutil.copyfile(shot, artifacts / "dashboard.png")

        # A cancelled confirmation sends nothing.
        records = len(_history(state))
        _click(driver, f"rollback-{APP}")
        assert _confirm(driver, accept=False) == "roll back drimeap from v1 (blue) to v2 (green)?"
        assert len(_history(state)) == records and _active(driver) == "v1"

        # The CLI's own refusal, shown in the page: the Standby group lost an instance.
        now = orjson.loads((state / "stack.json").read_bytes())  # deploy restarted green
        os.kill(now["instances"][f"{APP}-green-1"]["pid"], signal.SIGTERM)
        _click(driver, f"switch-{APP}")
        _confirm(driver)
        reason = _message(driver, "bad")
        assert reason.startswith("switch refused: Standby group green has 1/2 passing instances")
        assert reason.endswith("not switching.")
        assert _history(state)[-1]["result"] == "refused" and _active(driver) == "v1"
    finally:
        traffic.stop()
