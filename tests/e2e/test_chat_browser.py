"""8C in a real browser: the Gradio chat mounted on the API server, driven by headless Chromium.

A release built from the session's tiny run is served (uvicorn, loopback, a free port) by the same
create_app + mount_chat that `forge serve` runs. The test picks a mode, sends a message and watches the
answer stream in: the service's stream is held after its first text until the browser has shown that partial
answer, so a UI that wrote only the final answer could not pass. The routing panel must show the chosen option
and mode, then the latency; a thumbs-down with a comment must land in the feedback store 13A reads, for the
request the service answered.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.e2e

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
INSTALL = "apt-get install -y chromium chromium-driver (Debian's) and pip install selenium"
SCREENSHOT = REPO / "out" / "test-artifacts" / "chat_ui.png"
QUESTION = "Write a Python function that returns the sum of a list of numbers."
COMMENT = "Not what I asked: no function in the answer."
WAIT_S = 60


def require_browser() -> None:
    """Chromium, its driver and selenium, else skip locally; CI must run this test."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium")
    if not missing:
        return
    if os.environ.get("CI"):
        pytest.fail(f"missing {missing}: install with `{INSTALL}`")
    pytest.skip(f"no headless browser ({', '.join(missing)} missing): {INSTALL}")


class HeldStream:
    """Wraps service.stream: keeps every event and holds the answer after its first visible text until the
    test releases it (once it has seen that partial answer in the browser)."""

    def __init__(self, stream: Callable[..., Iterator[dict[str, Any]]]) -> None:
        self.inner = stream
        self.events: list[dict[str, Any]] = []
        self.held, self.release = threading.Event(), threading.Event()

    def __call__(self, req: Any) -> Iterator[dict[str, Any]]:
        text = ""
        for event in self.inner(req):
            self.events.append(event)
            yield event
            if event["type"] == "delta":
                text += event["text"]
                if text.strip() and not self.held.is_set():
                    self.held.set()
                    self.release.wait(WAIT_S)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def chat_server(tiny_run: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    require_browser()
    import uvicorn

    from forge.serve.api import create_app
    from forge.serve.chat_ui import mount_chat
    from forge.serve.server import build_service
    from tests.serve_fixtures import build_release

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGE_HOME", str(tiny_run.home))
        started = time.perf_counter()
        release = build_release(tiny_run, tmp_path_factory.mktemp("chat_release") / "release")
        # a piece per token: at the tiny model's speed one 20 ms interval could carry the whole answer after
        # a whitespace first token, and the page would never show a partial one
        cfg = tiny_run.config({"serving": {"workers": 1, "default_max_tokens": 24, "stream_interval_ms": 0}})
        service = build_service(release, cfg)
        held = HeldStream(service.stream)
        service.stream = held  # the UI calls service.stream: it gets the held one
        app = mount_chat(create_app(service, cfg.serving, []), service)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, name="chat-uvicorn", daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        try:
            yield {"url": f"http://127.0.0.1:{port}", "service": service, "cfg": cfg, "held": held,
                   "setup_s": time.perf_counter() - started}
        finally:
            held.release.set()
            server.should_exit = True
            thread.join(timeout=15)
            service.close()


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1300"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def text_of(driver: Any, css: str) -> str:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[-1].text.strip() if found else ""


def text_with(driver: Any, css: str, part: str) -> str:
    """The element's text once it contains `part`, else ""."""
    text = text_of(driver, css)
    return text if part in text else ""


BOT = "#chatbot .message.bot"  # gradio 6's assistant bubbles


def test_chat_streams_shows_routing_and_records_feedback(chat_server: dict[str, Any], browser: Any) -> None:
    from selenium.webdriver.common.by import By

    from forge.routing.feedback import read_interval

    url, service, held = chat_server["url"], chat_server["service"], chat_server["held"]
    t0 = time.perf_counter()
    browser.get(f"{url}/chat/")
    box = wait_for("the page", lambda: browser.find_elements(By.CSS_SELECTOR, "#chat-input textarea"))[0]
    # the mode selector: default is the server's, "accurate" asks for the router's best modifier
    checked = browser.find_element(By.CSS_SELECTOR, "#mode input:checked").get_attribute("value")
    assert checked == chat_server["cfg"].serving.default_mode
    browser.find_element(By.CSS_SELECTOR, "#mode input[value='accurate']").click()
    box.send_keys(QUESTION)
    browser.find_element(By.CSS_SELECTOR, "#send").click()

    # streamed: the partial answer is on the page while the service is still generating
    wait_for("the service to stream its first text", held.held.is_set)
    partial = wait_for("the partial answer in the chatbot", lambda: text_of(browser, BOT))
    assert not held.of("done"), "the service finished before the browser showed a partial answer"
    route = held.of("route")[0]["route"]
    panel = text_of(browser, "#routing-panel")
    assert route.mode == "accurate" and route.option != "base"  # accurate: a modifier, not the base
    assert f"option {route.option}" in panel and "mode accurate" in panel, panel
    held.release.set()

    result = wait_for("the service's result", lambda: held.of("done") and held.of("done")[0]["result"])
    assert result.text.strip() and result.usage.completion_tokens > 1
    final = wait_for("the final answer", lambda: (t := text_of(browser, BOT)) != partial and t)
    assert len(final) > len(partial) and final.startswith(partial[: len(partial) // 2]), (partial, final)
    assert [m.text for m in browser.find_elements(By.CSS_SELECTOR, "#chatbot .message.user")][-1] == QUESTION
    panel = wait_for("latency in the routing panel",
                     lambda: text_with(browser, "#routing-panel", "time to first token"))
    assert f"option {route.option}" in panel and result.request_id in panel, panel
    assert box.get_attribute("value") == ""

    # thumbs down with a comment on that answer
    browser.find_element(By.CSS_SELECTOR, "#feedback-comment textarea").send_keys(COMMENT)
    browser.find_element(By.CSS_SELECTOR, "#thumbs-down").click()
    status = wait_for("the feedback confirmation", lambda: text_with(browser, "#feedback-status", "recorded"))
    assert result.request_id[:12] in status and "comment" in status, status
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))
    ui_s = time.perf_counter() - t0

    # what 13A will read: the decision and the rating of that request, in today's partition
    fb = service.feedback
    now = datetime.now(UTC)
    batch = read_interval(fb.store, fb.root, now - timedelta(days=1), now + timedelta(minutes=1))
    mine = [e for e in batch.events if e["request_id"] == result.request_id]
    decision = [e for e in mine if e["kind"] == "decision"]
    ratings = [e for e in mine if e["kind"] == "rating"]
    assert len(decision) == 1 and decision[0]["option"] == route.option, mine
    assert decision[0]["session_id"] == result.session_id and result.session_id.startswith("ui-")
    assert len(ratings) == 1, mine
    assert ratings[0]["rating"] == -1 and ratings[0]["comment"] == COMMENT
    assert ratings[0]["session_id"] == result.session_id
    print(f"chat UI: setup {chat_server['setup_s']:.1f} s, browser {ui_s:.1f} s; partial {len(partial)} -> "
          f"final {len(final)} chars; screenshot {SCREENSHOT}")


def test_chat_refuses_empty_and_unrated(chat_server: dict[str, Any], browser: Any) -> None:
    """Rating before any answer and sending an empty message warn instead of failing."""
    from selenium.webdriver.common.by import By

    browser.get(f"{chat_server['url']}/chat/")
    wait_for("the page", lambda: browser.find_elements(By.CSS_SELECTOR, "#thumbs-up"))
    browser.find_element(By.CSS_SELECTOR, "#thumbs-up").click()
    wait_for("the nothing-to-rate status", lambda: text_with(browser, "#feedback-status", "Nothing to rate"))
    before = len(chat_server["held"].events)
    browser.find_element(By.CSS_SELECTOR, "#send").click()
    wait_for("the empty-message warning", lambda: "Type a message" in (browser.find_element(
        By.TAG_NAME, "body").text))
    assert len(chat_server["held"].events) == before and not text_of(browser, BOT)
