"""What a browser can and cannot do to a local server (issue 12), in headless Chromium against real
`lemonade serve` processes.

An attacker's page is served by a small `http.server` on another port. Chromium resolves `evil.test` to
127.0.0.1 (`--host-resolver-rules`), so the page at `http://evil.test:P` is a foreign origin on this
machine, as a site the user visits would be. It tries what GA allowed any page to do: `fetch` POSTs to
`/api/v1/delete` and `/internal/shutdown` (with JSON, so preflighted, and with a simple content type,
so not) and form posts, including the text/plain form that smuggles a JSON body. Each reaches the
server and is refused there; the server stays up and the model stays. With a key set, a page on a
loopback origin (allowed by default, as HEAD) gets 401 for the same. The web UI itself still works with
a key: it asks for it once, keeps it for its own origin only, lists models, chats and streams the log.
"""
from __future__ import annotations

import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from api_support import running_server
from conftest import DEFAULT_MODEL, free_port, wait_for

selenium = pytest.importorskip("selenium")
from selenium.webdriver.common.by import By  # noqa: E402

from test_webui import (CHAT_TIMEOUT, CHROMEDRIVER, CHROMIUM, chromium, configure_short_answers,  # noqa: E402
                        console_errors, finished_state, last_assistant, wait)

pytestmark = [pytest.mark.timeout(900), pytest.mark.skipif(
    not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)), reason="needs Debian chromium and chromium-driver")]

KEY = "webui-key-6f0d13"
ATTACK_TIMEOUT = 30


@pytest.fixture(scope="module")
def browser():
    with chromium("--host-resolver-rules=MAP evil.test 127.0.0.1") as driver:
        yield driver


@pytest.fixture(scope="module")
def attacker():
    """A web server for the attacker's pages: `pages[path] = html`; yields (port, pages)."""
    pages: dict[str, str] = {}

    class Pages(BaseHTTPRequestHandler):
        def do_GET(self):
            body = pages.get(self.path.split("?")[0], "").encode()
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    port = free_port()
    httpd = ThreadingHTTPServer(("127.0.0.1", port), Pages)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield port, pages
    httpd.shutdown()
    httpd.server_close()


ATTACK_PAGE = """<!DOCTYPE html><html><body><iframe name="sink"></iframe><script>
const T = %(target)s, MODEL = %(model)s;
window.results = {};
async function attempt(name, url, init) {
  try { const r = await fetch(T + url, init); results[name] = r.type === 'opaque' ? 'opaque' : r.status; }
  catch (e) { results[name] = 'blocked'; }
}
function formPost(url, enctype, name, value) {
  const f = document.createElement('form');
  f.method = 'POST'; f.action = T + url; f.target = 'sink'; f.enctype = enctype;
  const i = document.createElement('input'); i.name = name; i.value = value;
  f.appendChild(i); document.body.appendChild(f); f.submit();
}
(async () => {
  await attempt('json_delete', '/api/v1/delete', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                                  body: JSON.stringify({model: MODEL})});
  await attempt('simple_delete', '/api/v1/delete', {method: 'POST', mode: 'no-cors',
                                                    headers: {'Content-Type': 'text/plain'},
                                                    body: JSON.stringify({model: MODEL})});
  await attempt('simple_shutdown', '/internal/shutdown', {method: 'POST', mode: 'no-cors', body: '{}'});
  // A text/plain form whose body is JSON: {"model":"<MODEL>","pad":"="}
  formPost('/api/v1/delete', 'text/plain', '{"model":"' + MODEL + '","pad":"', '"}');
  await new Promise((r) => setTimeout(r, 500));
  formPost('/internal/shutdown', 'application/x-www-form-urlencoded', 'a', 'b');
  results.done = true;
})();
</script></body></html>"""


def run_attack(browser, attacker, page_origin: str, server) -> dict:
    port, pages = attacker
    pages["/attack.html"] = ATTACK_PAGE % {"target": json.dumps(server.url), "model": json.dumps(DEFAULT_MODEL)}
    browser.get(f"{page_origin.replace('PORT', str(port))}/attack.html")
    return wait(browser, ATTACK_TIMEOUT).until(
        lambda d: (d.execute_script("return window.results") or {}).get("done") and d.execute_script(
            "return window.results"))


def refusals(server, status: int) -> list[str]:
    return re.findall(rf"\[Server\] (\w+ /(?:api/v1/delete|internal/shutdown)) - {status}", server.log_text())


def assert_untouched(server, headers: dict) -> None:
    assert server.proc.poll() is None, "the server stopped"
    assert requests.get(server.url + "/live", timeout=10).status_code == 200
    models = requests.get(server.api + "/models", headers=headers, timeout=30).json()["data"]
    assert DEFAULT_MODEL in [m["id"] for m in models], "the model was deleted"


@pytest.fixture(scope="module")
def open_server(tmp_path_factory, seeded_hub_cache, llama_server_bin):
    """No key at all: only the origin rules stand between a web page and the server."""
    with running_server(tmp_path_factory.mktemp("open"), seeded_hub_cache) as server:
        yield server


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, seeded_hub_cache, llama_server_bin):
    with running_server(tmp_path_factory.mktemp("keyed"), seeded_hub_cache,
                        env_extra={"LEMONADE_API_KEY": KEY}) as server:
        yield server


def test_a_foreign_page_cannot_delete_or_shut_down(browser, attacker, open_server):
    results = run_attack(browser, attacker, "http://evil.test:PORT", open_server)
    assert results["json_delete"] == "blocked"  # its preflight got 403: the POST was never sent
    assert results["simple_delete"] == "opaque" and results["simple_shutdown"] == "opaque"  # sent, refused
    wait_for(lambda: len(refusals(open_server, 403)) >= 5, ATTACK_TIMEOUT, what="the five refusals in the log")
    assert sorted(refusals(open_server, 403)) == sorted([
        "OPTIONS /api/v1/delete", "POST /api/v1/delete", "POST /api/v1/delete",
        "POST /internal/shutdown", "POST /internal/shutdown"])
    assert not refusals(open_server, 200)
    assert_untouched(open_server, {})


def test_a_loopback_page_without_the_key_gets_401(browser, attacker, keyed_server):
    """Loopback origins are allowed by default (HEAD); the key is what stops them."""
    results = run_attack(browser, attacker, "http://127.0.0.1:PORT", keyed_server)
    assert results["json_delete"] == 401  # the preflight passed (OPTIONS needs no key), the POST did not
    wait_for(lambda: len(refusals(keyed_server, 401)) >= 5, ATTACK_TIMEOUT, what="the five refusals in the log")
    assert sorted(refusals(keyed_server, 401)) == sorted([
        "POST /api/v1/delete", "POST /api/v1/delete", "POST /api/v1/delete",
        "POST /internal/shutdown", "POST /internal/shutdown"])
    assert not refusals(keyed_server, 200)
    assert_untouched(keyed_server, {"Authorization": f"Bearer {KEY}"})


def key_dialog_open(driver) -> bool:
    return driver.execute_script("const d = document.getElementById('key-dialog'); return !!(d && d.open);")


def test_web_ui_asks_for_the_key_once_then_chats(browser, keyed_server):
    console_errors(browser)  # drop what the attack pages logged
    browser.get(f"{keyed_server.url}/webapp.html?model={DEFAULT_MODEL}#llm-chat")
    wait(browser).until(key_dialog_open)
    assert "needs an API key" in browser.find_element(By.ID, "key-reason").text
    browser.find_element(By.ID, "key-input").send_keys(KEY)
    browser.find_element(By.ID, "key-save").click()
    wait(browser).until(lambda d: d.find_element(By.ID, "model-select").get_attribute("data-ready") == "true")
    assert not key_dialog_open(browser)
    assert browser.execute_script("return localStorage.getItem('lemonade.apiKey')") == KEY

    configure_short_answers(browser)
    browser.find_element(By.ID, "chat-input").send_keys("Say hello.")
    browser.find_element(By.ID, "send-btn").click()
    wait(browser, CHAT_TIMEOUT).until(finished_state)
    bubble = last_assistant(browser)
    assert bubble.get_attribute("data-state") == "done", bubble.text
    assert bubble.find_element(By.CSS_SELECTOR, ".content").text.strip()
    wait(browser).until(lambda d: DEFAULT_MODEL in d.find_element(By.ID, "server-status-text").text)

    browser.get(keyed_server.url + "/webapp.html#model-management")
    wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#models-tbody tr[data-model]"))
    assert not key_dialog_open(browser)

    browser.get(keyed_server.url + "/static/logs.html")
    wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#log-output .line"))
    assert browser.find_element(By.ID, "log-status-text").text == "Streaming"
    assert KEY not in browser.find_element(By.ID, "log-output").text  # nor in the server log
    # 401s before the key was typed are the only console errors
    assert console_errors(browser, allow=("401",)) == []


def test_the_key_stays_with_its_origin(browser, keyed_server):
    """localStorage is per origin: the same server under another name must be given the key again."""
    browser.get(keyed_server.url.replace("127.0.0.1", "localhost") + "/webapp.html")
    wait(browser).until(key_dialog_open)
    browser.find_element(By.ID, "key-cancel").click()
    browser.get(keyed_server.url + "/webapp.html")
    wait(browser).until(lambda d: d.find_element(By.ID, "model-select").get_attribute("data-ready") == "true")
    assert not key_dialog_open(browser)
    # "Forget the key" removes it: the next load asks again
    browser.find_element(By.ID, "key-btn").click()
    wait(browser).until(key_dialog_open)
    browser.find_element(By.ID, "key-forget").click()
    wait(browser).until(key_dialog_open)
    assert browser.execute_script("return localStorage.getItem('lemonade.apiKey')") is None
