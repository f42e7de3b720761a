"""Drive the web UI (resources/static) in headless Chromium against a real `lemonade serve`.

Needs Debian `chromium` + `chromium-driver` and `pip install selenium`; skipped otherwise.
The `lemonade_server` session fixture (tests/conftest.py) provides `.url` and `.model`.
"""
import contextlib
import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
PAGE_TIMEOUT = 30          # page load, model list, health line
CHAT_TIMEOUT = 300         # first chat may load the model into llama-server
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1280,900",
)

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="needs Debian chromium and chromium-driver",
)

# Records every text state of the newest assistant bubble, so the test can
# tell a streamed answer (many growing states) from one that lands at once.
OBSERVE_JS = """
window.__snaps = [];
const box = document.getElementById('chat-messages');
new MutationObserver(() => {
  const all = box.querySelectorAll('.message.assistant .content');
  const last = all[all.length - 1];
  if (!last) return;
  const t = last.textContent;
  if (t && window.__snaps[window.__snaps.length - 1] !== t) window.__snaps.push(t);
}).observe(box, {childList: true, subtree: true, characterData: true});
"""


def get_json(url):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=PAGE_TIMEOUT) as resp:
        return json.load(resp)


@contextlib.contextmanager
def chromium(*extra_flags: str):
    """Headless Chromium with a private profile, quit and removed afterwards."""
    profile = tempfile.mkdtemp(prefix="webui-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + extra_flags:
        opts.add_argument(flag)
    opts.add_argument("--user-data-dir=" + profile)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path keeps selenium-manager from trying to download one.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        yield driver


def console_errors(driver, allow=()):
    """SEVERE browser-console entries since the last call, minus allowed substrings."""
    return [e for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and not any(a in e["message"] for a in allow)]


def wait(driver, timeout=PAGE_TIMEOUT):
    return WebDriverWait(driver, timeout)


def open_chat(driver, server):
    driver.get(f"{server.url}/webapp.html?model={quote(server.model)}#llm-chat")
    wait(driver).until(lambda d: d.find_element(By.ID, "model-select").get_attribute("data-ready") == "true")


def configure_short_answers(driver):
    """Keep generations short: cap tokens and, for reasoning models, turn thinking off."""
    driver.find_element(By.CSS_SELECTOR, "#chat-settings summary").click()
    box = driver.find_element(By.ID, "set-max-tokens")
    box.clear()
    box.send_keys("48")
    thinking = driver.find_element(By.ID, "set-thinking")
    if thinking.is_displayed() and thinking.is_selected():
        thinking.click()
    driver.find_element(By.CSS_SELECTOR, "#chat-settings summary").click()


def last_assistant(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#chat-messages .message.assistant")[-1]


def finished_state(driver):
    bubbles = driver.find_elements(By.CSS_SELECTOR, "#chat-messages .message.assistant")
    state = bubbles[-1].get_attribute("data-state") if bubbles else None
    return state if state and state != "streaming" else False


def test_page_loads_without_console_errors(browser, lemonade_server):
    browser.get(lemonade_server.url + "/")            # GET / redirects to /webapp.html
    wait(browser).until(EC.title_is("Lemonade Server"))
    assert browser.current_url.split("?")[0].split("#")[0].endswith("/webapp.html")
    status = browser.find_element(By.ID, "server-status-text")
    wait(browser).until(lambda d: status.text not in ("", "Connecting…"))
    assert status.text != "Server unreachable"
    assert browser.find_element(By.ID, "llm-chat").is_displayed()
    assert console_errors(browser) == []


def test_model_picker_lists_served_models(browser, lemonade_server):
    served = [m["id"] for m in get_json(lemonade_server.url + "/api/v1/models")["data"]]
    assert lemonade_server.model in served
    open_chat(browser, lemonade_server)
    options = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "model-select")).options]
    assert options == served
    # ?model=NAME (what `lemonade run` opens) preselects that model.
    assert Select(browser.find_element(By.ID, "model-select")).first_selected_option.get_attribute("value") \
        == lemonade_server.model
    assert console_errors(browser) == []


def test_chat_streams_answer(browser, lemonade_server):
    open_chat(browser, lemonade_server)
    configure_short_answers(browser)
    browser.execute_script(OBSERVE_JS)
    box = browser.find_element(By.ID, "chat-input")
    box.send_keys("Count from one to ten in words.")
    browser.find_element(By.ID, "send-btn").click()

    wait(browser, CHAT_TIMEOUT).until(finished_state)
    bubble = last_assistant(browser)
    assert bubble.get_attribute("data-state") == "done", bubble.text
    answer = bubble.find_element(By.CSS_SELECTOR, ".content").text.strip()
    assert answer
    snaps = browser.execute_script("return window.__snaps")
    growing = [s for s in snaps if s.strip()]
    assert len(growing) >= 2, f"answer did not arrive incrementally: {snaps!r}"
    # The answer grew: the first state is shorter than the last and starts it
    # (compared without Markdown markers, which change once a span closes).
    def plain(text):
        return re.sub(r"[\s*`#_]", "", text)
    assert len(plain(growing[0])) < len(plain(growing[-1])), growing
    assert plain(growing[-1]).startswith(plain(growing[0])[:5]), growing
    assert not browser.find_elements(By.CSS_SELECTOR, "#chat-messages .message.error")
    assert browser.find_element(By.ID, "send-btn").is_enabled()
    assert not browser.find_element(By.ID, "stop-btn").is_enabled()
    # The health line now names the loaded model.
    wait(browser).until(lambda d: lemonade_server.model in d.find_element(By.ID, "server-status-text").text)

    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "webui-chat.png"))
    assert console_errors(browser) == []


def test_stop_button_aborts_stream(browser, lemonade_server):
    open_chat(browser, lemonade_server)
    browser.find_element(By.CSS_SELECTOR, "#chat-settings summary").click()
    box = browser.find_element(By.ID, "set-max-tokens")
    box.clear()
    box.send_keys("2000")
    browser.find_element(By.CSS_SELECTOR, "#chat-settings summary").click()
    browser.find_element(By.ID, "chat-input").send_keys("Write a very long story about a lemon tree.")
    browser.find_element(By.ID, "send-btn").click()
    wait(browser, CHAT_TIMEOUT).until(lambda d: finished_state(d) or last_assistant(d).find_element(
        By.CSS_SELECTOR, ".content").text.strip())
    stop = browser.find_element(By.ID, "stop-btn")
    if stop.is_enabled():
        stop.click()
        wait(browser).until(finished_state)
        assert last_assistant(browser).get_attribute("data-state") in ("stopped", "done")
    assert browser.find_element(By.ID, "send-btn").is_enabled()
    # The page fires GET /api/v1/halt like upstream's UI; B answers 404 there.
    assert console_errors(browser, allow=("/api/v1/halt",)) == []


def test_model_manager_lists_all_models(browser, lemonade_server):
    listed = get_json(lemonade_server.url + "/api/v1/models?show_all=true")["data"]
    browser.get(lemonade_server.url + "/webapp.html#model-management")
    rows = "#models-tbody tr[data-model]"
    wait(browser).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, rows)) == len(listed))
    flags = {r.get_attribute("data-model"): r.get_attribute("data-downloaded")
             for r in browser.find_elements(By.CSS_SELECTOR, rows)}
    assert flags == {m["id"]: str(bool(m["downloaded"])).lower() for m in listed}
    assert flags[lemonade_server.model] == "true"
    assert console_errors(browser) == []


def test_logs_page_streams(browser, lemonade_server):
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        opener.open(lemonade_server.url + "/api/v1/logs/stream", timeout=PAGE_TIMEOUT).close()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            pytest.skip("server has no log file to stream")
        raise
    browser.get(lemonade_server.url + "/static/logs.html")
    wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#log-output .line"))
    assert browser.find_element(By.ID, "log-status-text").text == "Streaming"
    assert console_errors(browser) == []
