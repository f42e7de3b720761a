"""A normal load logs no warnings (issue 16 item 4): while llama-server starts, its health probe is
refused a few times, which is expected and must not reach the log as urllib3 warnings."""
from __future__ import annotations

import http.server
import logging
import threading

import pytest
import requests

from api_support import DEFAULT_MODEL, running_server
from conftest import free_port
from lemonade.utils import http_client


class _Status(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def status_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Status)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("status,expected", [(200, True), (503, False)])
def test_probe_answers(status_server, monkeypatch, status, expected):
    monkeypatch.setattr(_Status, "status", status)
    port = status_server.server_address[1]
    assert http_client.is_reachable(f"http://127.0.0.1:{port}/health", 2.0) is expected
    assert http_client.is_reachable(f"http://127.0.0.1:{port}/other", 2.0) is False


def test_refused_probe_is_silent(caplog):
    """The answer of a child that has not bound its port yet: False, and not one log record, even at
    debug level (urllib3 logs every new connection and its failures)."""
    caplog.set_level(logging.DEBUG)
    url = f"http://127.0.0.1:{free_port()}/health"
    assert [http_client.is_reachable(url, 1.0) for _ in range(3)] == [False] * 3
    assert caplog.records == []


def test_load_logs_no_warning(tmp_path, seeded_hub_cache, llama_server_bin):
    with running_server(tmp_path, seeded_hub_cache) as server:
        before = len(server.log_text().splitlines())
        reply = requests.post(server.api + "/load", json={"model_name": DEFAULT_MODEL}, timeout=300)
        assert reply.status_code == 200, reply.text
        lines = server.log_text().splitlines()[before:]
    assert any("llama-server is ready" in line for line in lines), lines
    assert [line for line in lines if " WARNING " in line or "urllib3" in line] == []
