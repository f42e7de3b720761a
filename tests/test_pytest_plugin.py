"""The pytest plugin lemonade ships (`lemonade/pytest_plugin.py`, issue 16 item 5): this project's own
tests use its `lemonade_url` fixture, and a separate project (a temporary directory with one test file,
run by a second pytest) uses it as a user's project would."""
from __future__ import annotations

import configparser
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import openai
import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent

PROJECT_TEST = '''
import json, os, pathlib
import openai


def test_chat(lemonade_url, lemonade_model):
    client = openai.OpenAI(base_url=lemonade_url, api_key="unused")
    reply = client.chat.completions.create(model=lemonade_model, max_tokens=4,
                                           messages=[{"role": "user", "content": "Hi"}])
    assert reply.model == lemonade_model and reply.choices[0].message.content is not None
    pathlib.Path(os.environ["REPORT"]).write_text(json.dumps({"url": lemonade_url}))
'''


def test_fixture_serves_the_embedded_model(lemonade_url, lemonade_model):
    """The plugin's session server, in this project's own run (its environment comes from conftest's
    `lemonade_server_env`: a private cache, offline)."""
    assert lemonade_url.startswith("http://127.0.0.1:") and lemonade_url.endswith("/api/v1")
    client = openai.OpenAI(base_url=lemonade_url, api_key="unused")
    reply = client.chat.completions.create(model=lemonade_model, max_tokens=4,
                                           messages=[{"role": "user", "content": "What is a lemon?"}])
    assert reply.model == lemonade_model
    assert reply.usage.completion_tokens > 0
    assert lemonade_model in {m.id for m in client.models.list()}


def run_project(tmp_path: Path, env: dict, *args: str,
                source: str = PROJECT_TEST) -> tuple[subprocess.CompletedProcess, dict]:
    """A user's project: one test file (`source`) that uses the fixtures, run by its own pytest. The
    plugin is named with `-p` and autoloading is off, so the run is the same whether or not this
    checkout is installed with its entry point. Returns the run and what the test wrote to $REPORT."""
    import json

    project = tmp_path / "project"
    project.mkdir()
    (project / "test_with_lemonade.py").write_text(source)
    report = tmp_path / "report.json"
    env = {**env, "REPORT": str(report), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "lemonade.pytest_plugin",
                           "-p", "no:cacheprovider", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=600)
    return done, (json.loads(report.read_text()) if report.exists() else {})


def test_a_project_uses_the_fixture(tmp_path, lemonade_server_env):
    done, report = run_project(tmp_path, lemonade_server_env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    with pytest.raises(requests.ConnectionError):  # the session's server is gone with the session
        requests.get(report["url"].removesuffix("/api/v1") + "/live", timeout=5)


def test_a_project_can_point_the_fixture_at_a_running_server(tmp_path, lemonade_server_env, lemonade_url):
    done, report = run_project(tmp_path, lemonade_server_env, "--lemonade-url", lemonade_url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert report["url"] == lemonade_url


def test_entry_point_is_declared():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    entries = [line.strip() for line in config["options.entry_points"]["pytest11"].splitlines() if line.strip()]
    assert entries == ["lemonade = lemonade.pytest_plugin"]


def test_lemonade_itself_never_imports_pytest():
    """The plugin is the only module that imports pytest, and only pytest imports the plugin."""
    code = textwrap.dedent("""
        import sys
        import lemonade.cli_parser, lemonade.server_manager, lemonade.server, lemonade.server.handlers
        import lemonade.router, lemonade.backends.registry
        assert "pytest" not in sys.modules and "lemonade.pytest_plugin" not in sys.modules, sorted(sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    imports = re.compile(r"^\s*(from|import)\s+(pytest|_pytest|lemonade\.pytest_plugin)\b", re.M)
    importers = [p for p in (ROOT / "lemonade").rglob("*.py")
                 if p.name != "pytest_plugin.py" and imports.search(p.read_text())]
    assert importers == []
