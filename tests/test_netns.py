"""The namespace test hosts of `netns.py` do what the RPC tests rely on: hosts reach each other and
the root reaches them over TCP, nothing outside the private block is reachable from inside, teardown
leaves nothing behind (also when the test body fails), and the fixture skips with ip's own words where
namespaces are refused."""
from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import wait_for
from netns import Network, _block, check_available, interfaces, namespaces, network  # noqa: F401

HTTP_PORT = 8000  # each namespace has its own port space, so a fixed port cannot clash
FETCH = """
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
print(opener.open(sys.argv[1], timeout=5).status)
"""
CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
    print("connected")
except OSError as e:
    print(type(e).__name__, e.errno)
"""


def root_get(ip: str, port: int = HTTP_PORT) -> int:
    conn = http.client.HTTPConnection(ip, port, timeout=5)
    try:
        conn.request("GET", "/")
        return conn.getresponse().status
    finally:
        conn.close()


def tcp_open(ip: str, port: int) -> bool:
    try:
        socket.create_connection((ip, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def serve_http(host, directory: Path) -> subprocess.Popen:
    """A python http.server inside `host`, waited for (bounded) until it accepts from the root."""
    proc = host.popen([sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind", host.ip,
                       "--directory", str(directory)],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ready() -> bool:
        assert proc.poll() is None, f"http.server in {host.name} exited with {proc.returncode}"
        return tcp_open(host.ip, HTTP_PORT)

    wait_for(ready, 20, what=f"http.server in {host.name}")
    return proc


def test_hosts_reach_each_other_and_root_reaches_both(network, tmp_path):
    a, b = network.add_host("a"), network.add_host("b")
    assert a.ip != b.ip and {a.ip, b.ip} <= set(map(str, network.subnet.hosts()))
    for host in (a, b):
        serve_http(host, tmp_path)
        assert root_get(host.ip) == 200
    assert b.run([sys.executable, "-c", FETCH, f"http://{a.ip}:{HTTP_PORT}/"]).stdout.strip() == "200"
    assert a.run([sys.executable, "-c", FETCH, f"http://{b.ip}:{HTTP_PORT}/"]).stdout.strip() == "200"
    assert a.traffic().total > 0  # the counters the RPC test reads do move


def test_nothing_outside_the_block_is_reachable_from_a_host(network):
    a = network.add_host("a")
    with socket.socket() as listener:  # proves 127.0.0.1:<port> is open in the root namespace
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert tcp_open("127.0.0.1", port)
        inside = a.run([sys.executable, "-c", CONNECT, "127.0.0.1", str(port)]).stdout.split()
    assert inside[0] == "ConnectionRefusedError"  # the host's own loopback, not the root's

    other_block = _block((network.index + 1) % 16)  # in 10.77.0.0/24 but not routed for this host
    inside = a.run([sys.executable, "-c", CONNECT, str(other_block[2]), "80"]).stdout.split()
    assert inside == ["OSError", "101"]  # ENETUNREACH, raised locally: no packet leaves

    routes = a.run(["ip", "route"]).stdout.splitlines()
    assert routes == [f"{network.subnet} dev {a.ns_if} proto kernel scope link src {a.ip} "]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_teardown_leaves_nothing_even_when_the_body_fails():
    try:
        check_available()
    except Exception as e:
        pytest.skip(f"network namespaces unavailable: {e}")
    with pytest.raises(ZeroDivisionError):
        with Network() as net:
            a, b = net.add_host("a"), net.add_host("b")
            a.popen(["sleep", "600"])
            # a process that detaches into its own session: only `ip netns pids` still finds it
            b.popen(["sh", "-c", "setsid sleep 600 & exec sleep 600"])
            wait_for(lambda: len(b.pids()) == 2, 10, what="both sleepers in b")
            pids = a.pids() + b.pids()
            names = [a.name, b.name]
            links = [net.bridge, a.root_if, b.root_if]
            assert set(names) <= set(namespaces()) and set(links) <= set(interfaces())
            1 / 0
    assert not set(names) & set(namespaces())
    assert not set(links) & set(interfaces())
    wait_for(lambda: not any(_alive(p) for p in pids), 10, what="namespace processes to be gone")


def test_fixture_skips_with_ips_own_words_without_cap_sys_admin(tmp_path):
    """Run this file's first test in a pytest without CAP_SYS_ADMIN: it must be skipped, and the
    reason must quote what `ip netns add` itself printed there."""
    drop = ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin"]
    if os.geteuid() != 0:
        pytest.skip("needs root to drop CAP_SYS_ADMIN from")
    refused = subprocess.run(drop + ["ip", "netns", "add", "lemnocap"], capture_output=True, text=True)
    assert refused.returncode != 0, "ip netns add worked without CAP_SYS_ADMIN"
    tests = Path(__file__).resolve().parent
    result = subprocess.run(
        drop + [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs",
                f"{tests / 'test_netns.py'}::test_hosts_reach_each_other_and_root_reaches_both"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert "1 skipped" in result.stdout, result.stdout + result.stderr
    assert refused.stderr.strip() in result.stdout
