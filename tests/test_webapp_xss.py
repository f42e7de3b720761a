"""Model names in `/webapp.html` cannot run script (issue 15 item 2), in headless Chromium.

The page carries every registered model inside a `<script>` element (`window.SERVER_MODELS = {...}`).
A user model whose name holds `</script><script>...` used to end that element and run its own. The
names below are registered in `user_models.json` of a real `lemonade serve`; the page must load with
none of them run, and with each of them intact in `SERVER_MODELS`.
Needs Debian `chromium` + `chromium-driver` and selenium (as tests/test_webui.py); skipped otherwise.
"""
from __future__ import annotations

import re

import pytest
import requests

from api_support import running_server
from test_webui import browser, console_errors, wait  # noqa: F401  (browser is a fixture)

EVIL = [
    "</script><script>document.title='pwned';window.__pwned=1</script>",
    "</SCRIPT ><img src=x onerror=\"window.__pwned=2\">",
    "<!--<script>window.__pwned=3//",
    "\u2028window.__pwned=4\u2029",
    "{{PLATFORM_JS}}&amp;{{SERVER_MODELS_JS}}",
]
ENTRY = {"checkpoint": "org/none-GGUF:Q4_0", "recipe": "llamacpp", "labels": ["custom"]}


@pytest.fixture(scope="module")
def server(tmp_path_factory, seeded_hub_cache, llama_server_bin):
    with running_server(tmp_path_factory.mktemp("xss"), seeded_hub_cache,
                        user_models={name: ENTRY for name in EVIL}) as s:
        yield s


def test_model_names_cannot_run_script_in_the_page(browser, server):  # noqa: F811
    browser.get(server.url + "/webapp.html")
    wait(browser).until(lambda d: d.execute_script("return document.readyState") == "complete")
    assert browser.execute_script("return window.__pwned") is None
    assert browser.title == "Lemonade Server"
    names = browser.execute_script("return Object.keys(window.SERVER_MODELS)")
    assert {"user." + name for name in EVIL} <= set(names)
    assert browser.execute_script("return window.PLATFORM") == "Linux"
    assert console_errors(browser, allow=("favicon",)) == []

    page = requests.get(server.url + "/webapp.html", timeout=30).text
    script = re.search(r"<script>window\.SERVER_MODELS = (.*?);</script>", page, re.S).group(1)
    assert "<" not in script and ">" not in script and "&" not in script
    assert "\u2028" not in script and "\u2029" not in script
    assert page.count("<script>window.PLATFORM = 'Linux';</script>") == 1  # no placeholder refilled
