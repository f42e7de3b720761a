"""lemonade.system_info on the real machine (spec system-info.md).

The machine is probed for real. Hardware this container cannot have (AMD/NVIDIA GPUs, odd lscpu output)
is fed through fake executables that the test writes into a directory put first on PATH. The one
non-machine seam is `find_llama_server_or_none`, owned by the llama.cpp backend module.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from lemonade import system_info
from lemonade.backends import registry


def system_info_with_engines(verbose: bool = False) -> dict:
    """`/system-info` as the server builds it: hardware from system_info, engines from the recipes."""
    return system_info.get_system_info(verbose, engines=registry.inference_engines)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux detection path")

DEVICE_KEYS = {"cpu", "amd_igpu", "amd_dgpu", "nvidia_dgpu", "npu"}


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """A private cache dir and no inherited overrides, for every test."""
    monkeypatch.setenv("LEMONADE_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("LEMONADE_CI_MODE", "RYZENAI_SKIP_PROCESSOR_CHECK"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "cache" / "hardware_info.json"


@pytest.fixture
def llama_server(monkeypatch):
    """Control what the backend module reports as the llama-server binary (None = not installed)."""
    try:
        import lemonade.backends.llamacpp_server as module
    except ImportError:  # the backend module is written in parallel; stand in for its one function
        module = types.ModuleType("lemonade.backends.llamacpp_server")
        monkeypatch.setitem(sys.modules, module.__name__, module)
    found: dict[str, Path | None] = {"path": None}
    monkeypatch.setattr(module, "find_llama_server_or_none", lambda backend="vulkan": found["path"],
                        raising=False)
    return found


@pytest.fixture
def fake_bin(tmp_path, monkeypatch):
    """Write fake tools into a dir that comes first on PATH: fake_bin(name, stdout, rc=0, sleep=0)."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def write(name: str, stdout: str = "", rc: int = 0, sleep: float = 0, body: str = "") -> None:
        script = bin_dir / name
        script.write_text(body or f"#!/bin/sh\n{'sleep %s' % sleep if sleep else ''}\n"
                                  f"cat <<'EOF'\n{stdout}\nEOF\nexit {rc}\n")
        script.chmod(0o755)

    write.dir = bin_dir
    return write


def _meminfo_total_kb() -> int:
    return int(re.search(r"^MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M).group(1))


# ------------------------------------------------------------------ shape on this machine ---------

def test_non_verbose_shape(llama_server):
    info = system_info_with_engines()
    assert set(info) == {"OS Version", "Processor", "Physical Memory", "devices"}
    assert info["OS Version"] == "Linux"
    assert set(info["devices"]) == DEVICE_KEYS
    assert isinstance(info["devices"]["amd_dgpu"], list) and isinstance(info["devices"]["nvidia_dgpu"], list)
    npu = info["devices"]["npu"]
    assert npu == {"name": "AMD NPU", "available": False, "inference_engines": {"oga": {"available": False}},
                   "error": "NPU detection not yet implemented for Linux"}
    json.dumps(info)  # serialisable as is


def test_verbose_adds_only_python_packages(llama_server):
    short, full = system_info_with_engines(), system_info_with_engines(verbose=True)
    assert set(full) - set(short) == {"Python Packages"}
    assert full["Python Packages"] == ["not-applicable"]


def test_physical_memory_matches_proc_meminfo(llama_server):
    expected = f"{round(_meminfo_total_kb() // 1024 / 1024, 2):.2f} GB"
    assert system_info_with_engines()["Physical Memory"] == expected
    free = shutil.which("free") and subprocess.run(["free", "-m"], capture_output=True, text=True).stdout
    if free:  # the C++ source of this number
        total_mib = int(free.splitlines()[1].split()[1])
        assert abs(float(expected.split()[0]) - total_mib / 1024) < 0.011


@pytest.mark.skipif(shutil.which("lscpu") is None, reason="no lscpu here")
def test_processor_and_cpu_match_lscpu(llama_server):
    out = subprocess.run(["lscpu"], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}).stdout
    model = re.search(r"^Model name:\s*(.+)$", out, re.M).group(1).strip()
    threads = int(re.search(r"^CPU\(s\):\s*(\d+)", out, re.M).group(1))
    info = system_info_with_engines()
    cpu = info["devices"]["cpu"]
    assert info["Processor"] == model == cpu["name"]
    assert cpu["threads"] == threads and cpu["available"] is True and cpu["cores"] >= 1
    assert "error" not in cpu


def test_missing_tools_do_not_fail(fake_bin, monkeypatch, llama_server):
    """A container without lscpu/lspci/vulkaninfo: errors in the body, never an exception."""
    monkeypatch.setenv("PATH", str(fake_bin.dir))  # an empty PATH dir: no tool can be found
    info = system_info_with_engines()
    devices = info["devices"]
    assert info["Processor"] == "ERROR - Failed to execute lscpu"
    assert devices["cpu"]["error"] == "Failed to execute lscpu command" and not devices["cpu"]["available"]
    assert devices["amd_igpu"]["error"] == "No AMD integrated GPU found"
    assert devices["amd_dgpu"] == [{"name": "", "available": False, "inference_engines": None,
                                    "error": "No AMD discrete GPU found"}]
    assert devices["nvidia_dgpu"][0]["error"] == "No NVIDIA discrete GPU found"
    assert devices["cpu"]["inference_engines"]["llamacpp-vulkan"] == {
        "available": False, "error": "vulkan binaries not installed"}
    assert devices["amd_igpu"]["inference_engines"]["llamacpp-rocm"] == {
        "available": False, "error": "rocm not available"}


def test_hung_tool_is_cut_off(fake_bin, monkeypatch, llama_server):
    monkeypatch.setattr(system_info, "PROBE_TIMEOUT_S", 0.5)
    fake_bin("lspci", "03:00.0 VGA compatible controller: NVIDIA Corporation X", sleep=30)
    start = time.monotonic()
    assert system_info.get_device_dict()["nvidia_dgpu"][0]["name"] == ""
    assert time.monotonic() - start < 10


# ------------------------------------------------------------------ fake hardware through PATH ----

LSPCI = """\
00:02.0 VGA compatible controller: Intel Corporation Alder Lake-P GT2 [Iris Xe Graphics] (rev 0c)
00:1f.3 Audio device: Advanced Micro Devices, Inc. [AMD] Family 17h HD Audio Controller
01:00.0 VGA compatible controller: NVIDIA Corporation AD102 [GeForce RTX 4090] (rev a1)
03:00.0 VGA compatible controller: Advanced Micro Devices, Inc. [AMD/ATI] Navi 31 [Radeon RX 7900 XT/7900 XTX/7900 GRE/7900M] (rev c8)
c5:00.0 Display controller: Advanced Micro Devices, Inc. [AMD/ATI] Strix Halo [Radeon Graphics / Radeon 8050S / 8060S Graphics] (rev c1)
c6:00.0 Display controller: Advanced Micro Devices, Inc. [AMD/ATI] Phoenix1 (rev c7)"""


def test_gpu_classification_from_lspci(fake_bin, llama_server, tmp_path):
    fake_bin("lspci", LSPCI)
    fake_bin("nvidia-smi", body='#!/bin/sh\ncase "$1" in\n'
             '  --query-gpu=driver_version) echo 550.54.14 ;;\n'
             '  --query-gpu=memory.total) echo 24564; echo 8192 ;;\n  *) exit 9 ;;\nesac\n')
    fake_bin("vulkaninfo", "Devices:\n  GPU0: fake")
    binary = tmp_path / "llama" / "llama-server"
    binary.parent.mkdir()
    binary.write_text("")
    (binary.parent / "version.txt").write_text("b6510\n")
    llama_server["path"] = binary

    info = system_info_with_engines()
    devices = info["devices"]
    strix = "Advanced Micro Devices, Inc. [AMD/ATI] Strix Halo [Radeon Graphics / Radeon 8050S / 8060S Graphics] (rev c1)"
    assert devices["amd_igpu"]["name"] == strix  # first integrated one; Phoenix1 is dropped
    assert [g["name"] for g in devices["amd_dgpu"]] == [
        "Advanced Micro Devices, Inc. [AMD/ATI] Navi 31 [Radeon RX 7900 XT/7900 XTX/7900 GRE/7900M] (rev c8)"]
    assert "driver_version" not in devices["amd_dgpu"][0]
    nvidia = devices["nvidia_dgpu"]
    assert [g["name"] for g in nvidia] == ["NVIDIA Corporation AD102 [GeForce RTX 4090] (rev a1)"]
    assert nvidia[0]["driver_version"] == "550.54.14" and nvidia[0]["vram_gb"] == 24.0

    ok = {"available": True, "version": "b6510"}
    assert devices["amd_igpu"]["inference_engines"]["llamacpp-rocm"] == {**ok, "backend": "rocm"}
    assert devices["amd_igpu"]["inference_engines"]["llamacpp-vulkan"] == {**ok, "backend": "vulkan"}
    assert devices["amd_dgpu"][0]["inference_engines"]["llamacpp-rocm"] == {**ok, "backend": "rocm"}
    assert set(nvidia[0]["inference_engines"]) == {"llamacpp-vulkan"}
    assert devices["cpu"]["inference_engines"]["llamacpp-vulkan"] == {**ok, "backend": "vulkan"}


def test_lscpu_parsing_from_fake(fake_bin, monkeypatch, llama_server):
    fake_bin("lscpu", "CPU(s):                 64\nOn-line CPU(s) list:    0-63\n"
                      "Model name:             AMD EPYC 9354 32-Core Processor\n"
                      "BIOS Model name:        AMD EPYC 9354 32-Core Processor    Unknown CPU @ 3.2GHz\n"
                      "Core(s) per socket:     16\nSocket(s):              2\nNUMA node0 CPU(s):      0-63")
    info = system_info_with_engines()
    cpu = info["devices"]["cpu"]
    # C++ would put the BIOS line in cpu.name (spec §9); both fields use the real model name here.
    assert info["Processor"] == cpu["name"] == "AMD EPYC 9354 32-Core Processor"
    assert (cpu["cores"], cpu["threads"]) == (32, 64)
    fake_bin("lscpu", "Architecture: x86_64")
    monkeypatch.setenv("LEMONADE_CI_MODE", "1")  # bypass the cache the first call wrote
    info = system_info_with_engines()
    assert info["Processor"] == "ERROR - Processor name not found"
    assert info["devices"]["cpu"]["error"] == "No CPU information found"


# ------------------------------------------------------------------ hardware cache (§6) -----------

def _has_engines(value) -> bool:
    if isinstance(value, dict):
        return "inference_engines" in value or any(_has_engines(v) for v in value.values())
    return isinstance(value, list) and any(_has_engines(v) for v in value)


def test_cache_written_stripped_then_reused(isolated_env, llama_server):
    first = system_info_with_engines()
    cache = json.loads(isolated_env.read_text())
    assert cache["version"] == "0.1.0" and set(cache["hardware"]) == DEVICE_KEYS
    assert not _has_engines(cache["hardware"])
    assert first["devices"]["amd_dgpu"][0]["inference_engines"] is None  # uncached placeholder quirk

    cache["hardware"]["cpu"]["name"] = "Cached CPU"
    isolated_env.write_text(json.dumps(cache))
    second = system_info_with_engines()
    assert second["devices"]["cpu"]["name"] == "Cached CPU"  # detection did not run again
    assert "oga" in second["devices"]["cpu"]["inference_engines"]  # engines are never cached
    assert "inference_engines" not in second["devices"]["amd_dgpu"][0]  # cached placeholder quirk


@pytest.mark.parametrize("value", ["1", "true", "ON", "Yes"])
def test_ci_mode_ignores_and_skips_cache(isolated_env, monkeypatch, llama_server, value):
    isolated_env.parent.mkdir(parents=True)
    isolated_env.write_text(json.dumps({"version": "0.1.0", "hardware": {"cpu": {"name": "Cached CPU"}}}))
    monkeypatch.setenv("LEMONADE_CI_MODE", value)  # a truthy value disables the cache
    assert system_info_with_engines()["devices"]["cpu"]["name"] != "Cached CPU"
    isolated_env.unlink()
    system_info_with_engines()
    assert not isolated_env.exists()


@pytest.mark.parametrize("value", ["", "0", "false", "no"])
def test_ci_mode_off_values_keep_the_cache(isolated_env, monkeypatch, llama_server, value):
    """path_utils.is_true for every flag: unlike C++ (any value, even empty), these mean off."""
    isolated_env.parent.mkdir(parents=True)
    isolated_env.write_text(json.dumps({"version": "0.1.0", "hardware": {"cpu": {"name": "Cached CPU"}}}))
    monkeypatch.setenv("LEMONADE_CI_MODE", value)
    assert system_info.get_system_info()["devices"]["cpu"]["name"] == "Cached CPU"


@pytest.mark.parametrize("content", [
    '{"version": "0.0.9", "hardware": {"cpu": {"name": "Cached CPU"}}}',
    '{"hardware": {"cpu": {"name": "Cached CPU"}}}',
    '{"version": "0.1.0"}',
    '{"version": "0.1.0", "hardware": {"cpu": {"name": "Cach',
    "[]",
])
def test_invalid_cache_is_rewritten(isolated_env, llama_server, content):
    isolated_env.parent.mkdir(parents=True)
    isolated_env.write_text(content)
    assert system_info_with_engines()["devices"]["cpu"]["name"] != "Cached CPU"
    rewritten = json.loads(isolated_env.read_text())
    assert rewritten["version"] == "0.1.0" and set(rewritten["hardware"]) == DEVICE_KEYS


def test_unwritable_cache_still_answers(tmp_path, monkeypatch, llama_server):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LEMONADE_CACHE_DIR", str(blocker / "cache"))  # mkdir under a file fails
    assert set(system_info_with_engines()["devices"]) == DEVICE_KEYS


# ------------------------------------------------------------------ engines: llama-server location -

def test_llama_version_file_locations(tmp_path, llama_server):
    build = tmp_path / "vulkan" / "build" / "bin" / "llama-server"  # A-era build layout
    build.parent.mkdir(parents=True)
    build.write_text("")
    llama_server["path"] = build
    assert registry.inference_engines("cpu", "x")["llamacpp-vulkan"]["version"] == "unknown"
    (tmp_path / "vulkan" / "version.txt").write_text("  b7000 \n")
    assert registry.inference_engines("cpu", "x")["llamacpp-vulkan"] == {
        "available": True, "backend": "vulkan", "version": "b7000"}


def test_llama_server_found_by_the_backend_module(tmp_path, monkeypatch):
    """No stand-in: the real finder, pointed at a binary through its documented override."""
    pytest.importorskip("lemonade.backends.llamacpp_server")
    binary = tmp_path / "llama" / "rocm" / "bin" / "llama-server"  # <install dir>/bin layout
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    (binary.parent.parent / "version.txt").write_text("b6600")
    monkeypatch.setenv("LEMONADE_LLAMA_SERVER", str(binary))
    engines = registry.inference_engines("amd_dgpu", "AMD Radeon RX 7900 XTX")
    assert engines["llamacpp-rocm"] == {"available": True, "backend": "rocm", "version": "b6600"}
    monkeypatch.setenv("LEMONADE_LLAMA_SERVER", str(tmp_path / "missing"))
    assert registry.inference_engines("cpu", "")["llamacpp-vulkan"] == {
        "available": False, "error": "vulkan binaries not installed"}


def test_engine_keys_per_device_type(llama_server):
    keys = {t: set(registry.inference_engines(t, "Radeon 8060S"))
            for t in ("cpu", "amd_igpu", "amd_dgpu", "nvidia_dgpu", "npu")}
    assert keys == {"cpu": {"llamacpp-vulkan", "oga"}, "amd_igpu": {"llamacpp-vulkan", "llamacpp-rocm", "oga"},
                    "amd_dgpu": {"llamacpp-vulkan", "llamacpp-rocm", "oga"},
                    "nvidia_dgpu": {"llamacpp-vulkan"}, "npu": {"oga"}}  # flm is Windows only


def test_macos_summary_shape(monkeypatch, llama_server):
    """macOS cannot exist here, so only the OS family is swapped in; the stubs are fixed data."""
    monkeypatch.setattr(system_info, "_os_family", lambda: "macOS")
    monkeypatch.setattr(sys, "platform", "darwin")  # what the recipe specs look at
    info = system_info_with_engines(verbose=True)
    assert set(info) == {"OS Version", "devices", "Python Packages"} and info["OS Version"] == "macOS"
    assert info["devices"]["amd_dgpu"] == [] == info["devices"]["nvidia_dgpu"]
    assert [r for r in ("llamacpp", "flm", "oga-cpu", "whispercpp") if registry.spec_for(r).runs_here()] == [
        "llamacpp"]


# ------------------------------------------------------------------ recipe filter and ROCm tables -

@pytest.mark.parametrize("skip, npu", [(None, False), ("1", True), ("true", True), ("YES", True), ("On", True),
                                       ("yes", True), ("0", False), ("no", False), ("", False), ("y", False)])
def test_recipe_filter_table(monkeypatch, skip, npu):
    """path_utils.is_true, the one flag rule (C++ took exactly 1/true/yes, so `YES` was off there);
    Linux has no NPU without the override."""
    if skip is not None:
        monkeypatch.setenv("RYZENAI_SKIP_PROCESSOR_CHECK", skip)
    assert system_info.npu_available() is npu
    expected = {"llamacpp": True, "whispercpp": True, "sd-cpp": True, "flm": npu, "oga-npu": npu,
                "oga-hybrid": npu, "oga-cpu": npu, "oga-igpu": False}
    assert {r: registry.spec_for(r).runs_here() for r in expected} == expected


@pytest.mark.parametrize("name, arch", [
    ("Advanced Micro Devices, Inc. [AMD/ATI] Strix Halo [Radeon Graphics / Radeon 8050S / 8060S Graphics]", "gfx1151"),
    ("AMD Radeon 8050S", "gfx1151"),
    ("AMD Radeon AI PRO R9700", "gfx120X"),
    ("AMD Radeon RX 9070 XT", "gfx120X"),
    ("AMD Radeon RX 9060 XT", "gfx120X"),
    ("AMD Radeon RX 7900 XTX", "gfx110X"),
    ("AMD Radeon RX 7800 XT", "gfx110X"),
    ("AMD Radeon RX 7700 XT", "gfx110X"),
    ("AMD Radeon PRO V710", "gfx110X"),
    ("AMD Radeon RX 6800 XT", ""),
    ("AMD Radeon 780M Graphics", ""),
    ("NVIDIA GeForce RTX 4090", ""),
    ("Navi 31 [RX 7900 XT]", ""),  # no "radeon": unsupported even with a known number
    ("", ""),
])
def test_rocm_arch_table(name, arch):
    assert system_info.rocm_arch_for_gpu(name) == arch
