"""Test hosts as Linux network namespaces on a private bridge (iproute2; needs root / CAP_SYS_ADMIN).

Topology of one `Network`: a bridge `lembr<k>` in the root namespace holding the first address of a
/28 block of 10.77.0.0/24, and per host a namespace `lem<k>-<label>` joined to the bridge by a veth
pair (`lv<k>h<i>` stays in the root namespace, `lv<k>n<i>` goes into the host), with loopback up and
the next address of the block. Hosts have no default route: from inside, only the block is reachable.

Parallel runs do not clash: each network holds an exclusive flock on its block's lock file for its
whole life, and every name carries the block number. A block whose lock is free but whose devices
still exist was left by a run that died (the kernel dropped its lock), so it is swept before reuse.
Only addresses inside 10.77.0.0/24 are ever configured or targeted.
"""
from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pytest

SUPERNET = ipaddress.ip_network("10.77.0.0/24")
BLOCK_PREFIX = 28  # 16 blocks; in each: network, bridge (.1), up to 13 hosts, broadcast
MAX_HOSTS = 2 ** (32 - BLOCK_PREFIX) - 3
LOCK_DIR = Path(tempfile.gettempdir()) / "lemonade-netns"
IP_TIMEOUT = 15.0  # one `ip` command; they return in milliseconds unless the kernel is stuck
KILL_TIMEOUT = 10.0  # processes of a namespace gone after SIGKILL
LABEL_RE = re.compile(r"^[a-z0-9]{1,6}$")  # keeps `lem<k>-<label>` short and shell-safe


class NetnsUnavailable(RuntimeError):
    """`ip netns add` was refused (not root, no CAP_SYS_ADMIN, no iproute2); the text says why."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `ip ARGS…` (blocks up to IP_TIMEOUT). Raises RuntimeError with ip's stderr on failure."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT,
                            stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def namespaces() -> list[str]:
    """Names of all network namespaces (`ip netns list`, first column)."""
    return [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()]


def interfaces() -> list[str]:
    """Names of the root namespace's interfaces (a veth shows as `name@peer`; the peer is dropped)."""
    names = []
    for line in ip("-o", "link", "show").stdout.splitlines():
        names.append(line.split(":", 2)[1].strip().split("@")[0])
    return names


def namespace_pids(name: str) -> list[int]:
    """Processes living in namespace `name` (`ip netns pids`); empty once the namespace is gone."""
    result = ip("netns", "pids", name, check=False)
    return [int(p) for p in result.stdout.split()] if result.returncode == 0 else []


def check_available() -> None:
    """Add and delete a throwaway namespace. Raises NetnsUnavailable with the exact error text."""
    probe = f"lemchk{os.getpid()}"
    try:
        result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                                timeout=IP_TIMEOUT, stdin=subprocess.DEVNULL)
    except OSError as e:  # no iproute2 at all
        raise NetnsUnavailable(f"cannot run `ip netns add`: {e}") from e
    if result.returncode != 0:
        raise NetnsUnavailable(f"`ip netns add {probe}` failed ({result.returncode}): {result.stderr.strip()}")
    ip("netns", "del", probe)


@dataclass(frozen=True)
class Traffic:
    """Byte counters of a host's veth, seen from the root side (rx = sent by the host)."""

    rx_bytes: int
    tx_bytes: int

    @property
    def total(self) -> int:
        return self.rx_bytes + self.tx_bytes


@dataclass
class Host:
    """One namespace with one address. Processes started here are killed at teardown."""

    name: str  # the namespace
    ip: str
    root_if: str  # the veth end left in the root namespace (its counters are read there)
    ns_if: str
    started: list[subprocess.Popen] = field(default_factory=list)

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` wrapped so it runs inside this namespace (`ip netns exec` execs, it does not fork)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def popen(self, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start `argv` in the namespace; kwargs go to Popen (stdin defaults to /dev/null)."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.argv(argv), **kw)
        self.started.append(proc)
        return proc

    def run(self, argv: Sequence[str], timeout: float = 60.0, check: bool = True,
            **kw) -> subprocess.CompletedProcess:
        """Run `argv` to completion in the namespace, output captured as text. Raises
        subprocess.CalledProcessError (with the output) when `check` and it fails, TimeoutExpired."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.argv(argv), timeout=timeout, check=check, **kw)

    def pids(self) -> list[int]:
        return namespace_pids(self.name)

    def kill_all(self) -> None:
        """SIGKILL every process in the namespace and reap ours; blocks up to KILL_TIMEOUT.
        Raises RuntimeError naming the pids still there at the deadline."""
        deadline = time.monotonic() + KILL_TIMEOUT
        while True:
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for proc in self.started:
                if proc.poll() is None and proc.pid not in pids:
                    proc.kill()  # still in `ip netns exec`'s setns step: not listed yet
            for proc in self.started:
                try:
                    proc.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    pass
            if not self.pids() and all(p.poll() is not None for p in self.started):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes left in namespace {self.name}: {self.pids()}")
            time.sleep(0.05)

    def traffic(self) -> Traffic:
        stats = Path("/sys/class/net") / self.root_if / "statistics"
        return Traffic(int((stats / "rx_bytes").read_text()), int((stats / "tx_bytes").read_text()))


def _block(index: int) -> ipaddress.IPv4Network:
    return list(SUPERNET.subnets(new_prefix=BLOCK_PREFIX))[index]


def _names_of_block(index: int) -> tuple[list[str], list[str]]:
    """(namespaces, root interfaces) that carry block `index`'s names."""
    prefix = f"lem{index}-"
    nss = [n for n in namespaces() if n.startswith(prefix)]
    ifs = [i for i in interfaces() if i == f"lembr{index}" or re.fullmatch(rf"lv{index}[hn]\d+", i)]
    return nss, ifs


def _sweep_block(index: int) -> None:
    """Remove what a dead run left in block `index` (we hold its lock, so no live run owns it)."""
    nss, ifs = _names_of_block(index)
    for ns in nss:
        for pid in namespace_pids(ns):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        ip("netns", "del", ns, check=False)
    for name in ifs:
        ip("link", "del", name, check=False)


class Network:
    """A bridge in the root namespace plus hosts added with `add_host`. Use as a context manager:
    teardown runs on every way out and raises if anything could not be removed."""

    def __init__(self) -> None:
        self.hosts: dict[str, Host] = {}
        self._lock_file = None
        self.index = self._claim_block()
        self.subnet = _block(self.index)
        self.bridge = f"lembr{self.index}"
        self.gateway = str(self.subnet[1])
        try:
            ip("link", "add", self.bridge, "type", "bridge")
            ip("addr", "add", f"{self.gateway}/{BLOCK_PREFIX}", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
        except BaseException:
            self.teardown()
            raise

    def _claim_block(self) -> int:
        LOCK_DIR.mkdir(exist_ok=True)
        for index in range(2 ** (BLOCK_PREFIX - SUPERNET.prefixlen)):
            handle = open(LOCK_DIR / f"block-{index}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            self._lock_file = handle
            _sweep_block(index)
            return index
        raise RuntimeError(f"all {SUPERNET} blocks are in use by other test runs")

    def add_host(self, label: str) -> Host:
        """A new namespace `lem<k>-<label>` on the bridge, loopback up. Raises ValueError on a bad
        or repeated label or a full block, RuntimeError when `ip` refuses."""
        if not LABEL_RE.match(label) or label in self.hosts:
            raise ValueError(f"host label must be 1-6 of [a-z0-9] and unique, got {label!r}")
        i = len(self.hosts)
        if i >= MAX_HOSTS:
            raise ValueError(f"a network holds at most {MAX_HOSTS} hosts")
        host = Host(f"lem{self.index}-{label}", str(self.subnet[2 + i]),
                    f"lv{self.index}h{i}", f"lv{self.index}n{i}")
        self.hosts[label] = host  # before creating anything, so teardown finds partial work
        ip("netns", "add", host.name)
        ip("link", "add", host.root_if, "type", "veth", "peer", "name", host.ns_if)
        ip("link", "set", host.root_if, "master", self.bridge)
        ip("link", "set", host.root_if, "up")
        ip("link", "set", host.ns_if, "netns", host.name)
        inside = ("-n", host.name)
        ip(*inside, "link", "set", "lo", "up")
        ip(*inside, "addr", "add", f"{host.ip}/{BLOCK_PREFIX}", "dev", host.ns_if)
        ip(*inside, "link", "set", host.ns_if, "up")
        return host

    def teardown(self) -> None:
        """Kill every process in every host, delete namespaces, veths and the bridge, release the
        block. Safe to call twice. Raises RuntimeError listing what could not be removed."""
        problems = []
        for host in self.hosts.values():
            try:
                host.kill_all()
            except RuntimeError as e:
                problems.append(str(e))
            for step in (("netns", "del", host.name), ("link", "del", host.root_if)):
                result = ip(*step, check=False)
                if result.returncode != 0 and "No such" not in result.stderr \
                        and "Cannot find" not in result.stderr:
                    problems.append(f"`ip {' '.join(step)}`: {result.stderr.strip()}")
        if self.index is not None:
            ip("link", "del", getattr(self, "bridge", f"lembr{self.index}"), check=False)
            nss, ifs = _names_of_block(self.index)
            if nss or ifs:
                problems.append(f"left behind: namespaces {nss}, interfaces {ifs}")
        self.hosts = {}
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None
        if problems:
            raise RuntimeError("netns teardown incomplete: " + "; ".join(problems))

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()


def _fresh_network():
    try:
        check_available()
    except NetnsUnavailable as e:
        pytest.skip(f"network namespaces unavailable: {e}")
    with Network() as network:
        yield network


@pytest.fixture()
def network() -> Network:
    """A fresh private network; add hosts with `network.add_host("a")`. Skips, quoting the error,
    where `ip netns add` is refused. Teardown runs even when the test fails."""
    yield from _fresh_network()


@pytest.fixture(scope="module")
def module_network() -> Network:
    """As `network`, shared by the tests of one module, so hosts and the servers in them start once."""
    yield from _fresh_network()
