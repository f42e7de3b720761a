"""OS, CPU, memory and device detection (C++ `server/system_info.cpp`).

Which recipes can run here and each engine's status are the recipe specs' answers
(`lemonade.backends.registry`), built on the hardware facts this module gives; it imports no backend.

Contract: spec system-info.md. Detection shells out to the same tools as C++ (`lscpu`, `lspci`,
`nvidia-smi`, `rocm-smi`, `vulkaninfo`; WMI via PowerShell on Windows) but with argv lists, a short
timeout, stderr discarded and `LC_ALL=C`, and a missing tool just means "not found". The device dict
is cached in `hardware_info.json` (spec §6); inference engines are recomputed on every call (§5).
Every function here blocks on those probes (a few seconds at worst) and raises nothing of its own.
"""
from __future__ import annotations

import copy
import glob
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from lemonade.utils import path_utils
from lemonade.utils.json_utils import read_json, write_json_atomic

logger = logging.getLogger(__name__)

CACHE_VERSION = "0.1.0"  # hard-coded upstream and never bumped (spec §6)
CACHE_FILE_NAME = "hardware_info.json"
PROBE_TIMEOUT_S = 5.0  # one detection command; a hung driver tool must not hang /system-info
SUMMARY_KEYS = ("OS Version", "Processor", "Physical Memory", "devices")
# Lower-cased name fragments that make an AMD GPU "discrete" (spec §3.2).
AMD_DISCRETE_HINTS = ("rx ", "xt", "pro w", "pro v", "radeon pro", "firepro", "fury")
VULKAN_LIBS = (
    "/usr/lib/x86_64-linux-gnu/libvulkan.so.1",
    "/usr/lib/libvulkan.so.1",
    "/lib/x86_64-linux-gnu/libvulkan.so.1",
    "/usr/lib64/libvulkan.so.1",  # ours: Fedora/openSUSE and arm64 Debian, which C++ left to vulkaninfo
    "/usr/lib/aarch64-linux-gnu/libvulkan.so.1",
)


def _os_family() -> str:
    return {"win32": "Windows", "darwin": "macOS"}.get(sys.platform, "Linux")


def _run(argv: list[str]) -> str | None:
    """stdout of `argv`, or None when the tool is missing, fails or times out."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, timeout=PROBE_TIMEOUT_S, text=True,
                              errors="replace", env={**os.environ, "LC_ALL": "C"})
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _first_int(text: str) -> int | None:
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


# ---------------------------------------------------------------- Linux ----------------------------

def _lscpu() -> dict[str, str] | None:
    """`lscpu` as key → value (first occurrence wins), or None when it cannot run."""
    out = _run(["lscpu"])
    if out is None:
        return None
    fields: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def _linux_cpu() -> dict[str, Any]:
    fields = _lscpu()
    if fields is None:
        return {"name": "", "cores": 0, "threads": 0, "available": False,
                "error": "Failed to execute lscpu command"}
    # Exact "Model name" key: C++ matches any line *containing* it and so may pick up
    # "BIOS Model name" for cpu.name while Processor takes the first (spec §9); we use one value.
    name = fields.get("Model name", "")
    cpu: dict[str, Any] = {
        "name": name,
        "cores": (_first_int(fields.get("Core(s) per socket", "")) or 0)
        * (_first_int(fields.get("Socket(s)", "")) or 1),
        "threads": _first_int(fields.get("CPU(s)", "")) or 0,
        "available": bool(name),
    }
    if not name:
        cpu["error"] = "No CPU information found"
    return cpu


def _linux_processor() -> str:
    """Top-level `Processor`: run lscpu again, as C++ does, so it is fresh even when devices are cached."""
    fields = _lscpu()
    if fields is None:
        return "ERROR - Failed to execute lscpu"
    return fields.get("Model name") or "ERROR - Processor name not found"


def _linux_memory() -> str:
    # /proc/meminfo is what `free` reads; MemTotal kB // 1024 is free -m's "total" column.
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return "ERROR - Failed to execute free command"
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.MULTILINE)
    if not m:
        return "ERROR - Memory information not found"
    return f"{round(int(m.group(1)) // 1024 / 1024, 2):.2f} GB"


def _lspci_gpus() -> list[tuple[str, str]]:
    """(pci slot, device name) for each display controller lspci lists; [] without lspci."""
    gpus = []
    for line in (_run(["lspci"]) or "").splitlines():
        if re.search(r"vga|3d|display", line, re.IGNORECASE) and ": " in line:
            gpus.append((line.split(" ", 1)[0], line.split(": ", 1)[1].rstrip()))
    return gpus


def _amd_vram_gb(slot: str) -> float:
    # Per-device sysfs first (exact, in bytes). C++ asks rocm-smi first and gives its one number to
    # every GPU; we keep rocm-smi and the any-card drm glob only as fallbacks, in C++'s order.
    address = slot if slot.count(":") == 2 else f"0000:{slot}"
    vram = _sysfs_vram_gb(f"/sys/bus/pci/devices/{address}/mem_info_vram_total") or _rocm_smi_vram_gb()
    for path in sorted(glob.glob("/sys/class/drm/card*/device/mem_info_vram_total")):
        vram = vram or _sysfs_vram_gb(path)
    return vram


def _sysfs_vram_gb(path: str) -> float:
    try:
        return round(int(Path(path).read_text().strip()) / 1024**3, 1)
    except (OSError, ValueError):
        return 0.0


def _rocm_smi_vram_gb() -> float:
    for line in (_run(["rocm-smi", "--showmeminfo", "vram", "--csv"]) or "").splitlines():
        if "Total VRAM" in line or "vram" in line:
            value = _first_int(line)
            if value is not None:  # > 100 means MiB, else already GiB (spec §3.2)
                return round(value / 1024, 1) if value > 100 else float(value)
    return 0.0


def _nvidia_driver() -> str:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader,nounits"])
    if out and out.strip():
        return out.splitlines()[0].strip()
    try:
        m = re.search(r"Kernel Module\s+(\d+\.\d+(?:\.\d+)?)", Path("/proc/driver/nvidia/version").read_text())
    except OSError:
        m = None
    return m.group(1) if m else "Unknown"


def _nvidia_vram_gb() -> float:
    out = _run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"]) or ""
    value = _first_int(out)  # the first GPU's value is used for all, as in C++
    return round(value / 1024, 1) if value else 0.0


def _gpu(name: str, vram_gb: float = 0.0, driver: str = "") -> dict[str, Any]:
    gpu: dict[str, Any] = {"name": name, "available": True, "inference_engines": None}
    if vram_gb > 0:
        gpu["vram_gb"] = vram_gb
    if driver:
        gpu["driver_version"] = driver
    return gpu


def _placeholder(error: str) -> dict[str, Any]:
    return {"name": "", "available": False, "inference_engines": None, "error": error}


def _assemble(cpu: dict[str, Any], igpus: list, dgpus: list, nvidia: list, npu: dict[str, Any]) -> dict[str, Any]:
    """The five device keys, with the C++ placeholder entries where nothing was found."""
    return {"cpu": cpu, "amd_igpu": igpus[0] if igpus else _placeholder("No AMD integrated GPU found"),
            "amd_dgpu": dgpus or [_placeholder("No AMD discrete GPU found")],
            "nvidia_dgpu": nvidia or [_placeholder("No NVIDIA discrete GPU found")], "npu": npu}


def _linux_devices() -> dict[str, Any]:
    igpus, dgpus, nvidia = [], [], []
    for slot, name in _lspci_gpus():
        if "AMD" in name or "ATI" in name:  # case-sensitive, as upstream
            if any(hint in name.lower() for hint in AMD_DISCRETE_HINTS):
                dgpus.append(_gpu(name, _amd_vram_gb(slot)))
            else:
                igpus.append(_gpu(name))
        elif "NVIDIA" in name or "nvidia" in name:
            nvidia.append(_gpu(name, _nvidia_vram_gb(), _nvidia_driver()))
    npu = {"name": "AMD NPU", "available": False, "error": "NPU detection not yet implemented for Linux"}
    return _assemble(_linux_cpu(), igpus, dgpus, nvidia, npu)


# ---------------------------------------------------------------- Windows (untested here) ----------

def _cim(cls: str, props: str) -> list[dict[str, Any]]:
    """Rows of a WMI class through PowerShell (C++ uses COM WMI directly)."""
    out = _run(["powershell", "-NoProfile", "-NonInteractive", "-Command",
                f"Get-CimInstance {cls} | Select-Object {props} | ConvertTo-Json -Compress"])
    try:
        rows = json.loads(out) if out and out.strip() else []
    except ValueError:
        return []
    return rows if isinstance(rows, list) else [rows]


def _windows_devices() -> dict[str, Any]:
    cpus = _cim("Win32_Processor", "Name,NumberOfCores,NumberOfLogicalProcessors")
    cpu = ({"name": (cpus[0].get("Name") or "").strip(), "cores": cpus[0].get("NumberOfCores") or 0,
            "threads": cpus[0].get("NumberOfLogicalProcessors") or 0, "available": True} if cpus else
           {"name": "", "cores": 0, "threads": 0, "available": False, "error": "No CPU information found"})
    drivers = {d.get("DeviceName") or "": d.get("DriverVersion") or ""
               for d in _cim("Win32_PnPSignedDriver", "DeviceName,DriverVersion")}
    amd_driver = drivers.get("AMD-OpenCL User Mode Driver", "")
    nv_driver = next((v for k, v in drivers.items() if "NVIDIA" in k), "")
    igpus, dgpus, nvidia = [], [], []
    for vc in _cim("Win32_VideoController", "Name,AdapterRAM"):
        name, vram = vc.get("Name") or "", (vc.get("AdapterRAM") or 0) / 1024**3  # unrounded upstream
        if "AMD" in name and "Radeon" in name:
            discrete = any(hint in name.lower() for hint in AMD_DISCRETE_HINTS)
            (dgpus if discrete else igpus).append(_gpu(name, vram, amd_driver))
        elif "NVIDIA" in name:
            nvidia.append(_gpu(name, vram, nv_driver))
    npu_driver = drivers.get("NPU Compute Accelerator Device")
    npu: dict[str, Any] = {"name": "AMD NPU", "available": npu_driver is not None}
    if npu_driver is not None:
        npu["driver_version"] = npu_driver
        xrt = _run([r"C:\Windows\System32\AMD\xrt-smi.exe", "examine", "-r", "platform"]) or ""
        mode = next((line.split() for line in xrt.splitlines() if line.strip().startswith("Mode")), [])
        npu["power_mode"] = mode[-1] if mode else "Unknown"
    else:
        npu["error"] = "No NPU device found"  # wording not in the spec; unverified against C++
    return _assemble(cpu, igpus, dgpus, nvidia, npu)


def _windows_summary(devices: dict[str, Any]) -> dict[str, str]:
    cpu = devices["cpu"]
    processor = (f"{cpu['name']} ({cpu['cores']} cores, {cpu['threads']} logical processors)"
                 if cpu.get("available") else "Processor information not found.")
    total = sum(int(m.get("Capacity") or 0) for m in _cim("Win32_PhysicalMemory", "Capacity"))
    memory = f"{total / 1024**3:.2f} GB" if total else "Physical memory information not found."
    return {"Processor": processor, "Physical Memory": memory}


def _macos_devices() -> dict[str, Any]:
    stub = {"name": "", "available": False}
    return {"cpu": {**stub, "cores": 0, "threads": 0, "error": "macOS CPU detection not implemented yet"},
            "amd_igpu": {**stub, "error": "macOS AMD iGPU detection not implemented yet"},
            "amd_dgpu": [], "nvidia_dgpu": [],
            "npu": {**stub, "error": "macOS NPU detection not implemented yet"}}


# ---------------------------------------------------------------- hardware facts engines need ------

def vulkan_present() -> bool:
    """A Vulkan loader is installed (system-info.md §5): the library files, else `vulkaninfo`."""
    if sys.platform == "win32":
        root = path_utils.windows_system_root()
        return any(Path(root, d, "vulkan-1.dll").exists() for d in ("System32", "SysWOW64"))
    if any(Path(lib).exists() for lib in VULKAN_LIBS):
        return True
    return bool((_run(["vulkaninfo", "--summary"]) or "").strip())


def run_tool(argv: list[str]) -> str | None:
    """stdout of a quick probe command (C locale, bounded), or None; for engine version probes."""
    return _run(argv)


def rocm_arch_for_gpu(name: str) -> str:
    """The ROCm gfx target for a GPU name, or "" when unsupported (spec §8)."""
    lower = name.lower()
    if "radeon" not in lower:
        return ""
    for arch, hints in (("gfx1151", ("8050s", "8060s")), ("gfx120X", ("r9700", "9060", "9070")),
                        ("gfx110X", ("7700", "7800", "7900", "v710"))):
        if any(h in lower for h in hints):
            return arch
    return ""


# ---------------------------------------------------------------- cache (§6) and public API --------

def get_device_dict() -> dict[str, Any]:
    """Detect hardware now (no cache, no engines filled in). Blocks on the probe commands."""
    return {"Windows": _windows_devices, "macOS": _macos_devices}.get(_os_family(), _linux_devices)()


def _cache_path() -> Path:
    return path_utils.lemonade_cache_dir() / CACHE_FILE_NAME


def _load_cached_hardware() -> dict[str, Any] | None:
    if path_utils.ci_mode():
        return None
    try:
        data = read_json(_cache_path())
    except (OSError, ValueError):
        return None  # corrupt or unreadable: re-detect and overwrite
    if isinstance(data, dict) and data.get("version") == CACHE_VERSION and isinstance(data.get("hardware"), dict):
        return data["hardware"]
    return None


def _strip_engines(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_engines(v) for k, v in value.items() if k != "inference_engines"}
    if isinstance(value, list):
        return [_strip_engines(v) for v in value]
    return value


def _hardware() -> dict[str, Any]:
    """Cached device dict, else detect and (unless CI mode) cache it without `inference_engines`."""
    path = _cache_path()
    cached = _load_cached_hardware()
    if cached is not None:
        logger.info("[Server] Using cached hardware info from: %s", path)
        return cached
    if path_utils.ci_mode():  # C++ would still write a file it then never reads; we skip it
        return get_device_dict()
    logger.info("[Server] Detecting hardware (will cache to: %s)", path)
    devices = get_device_dict()
    try:
        write_json_atomic(path, {"version": CACHE_VERSION, "hardware": _strip_engines(devices)})
        logger.info("[Server] Hardware info cached to: %s", path)
    except OSError as e:  # a read-only home must not break /system-info
        logger.warning("Could not write hardware cache %s: %s", path, e)
    return devices


EnginesOf = Callable[[str, str], dict]  # (device type, device name) -> that device's inference_engines


def _no_engines(device_type: str, device_name: str) -> dict:
    return {}


def get_system_info(verbose: bool = False, engines: EnginesOf = _no_engines) -> dict[str, Any]:
    """The /system-info response body (spec §1-§3). Blocks on detection when the cache is cold.

    `engines` fills each device's `inference_engines`; the server passes
    `lemonade.backends.registry.inference_engines` (this module knows hardware, not backends)."""
    devices = copy.deepcopy(_hardware())
    # Engines are recomputed every call (§1 step 4). Placeholder dGPUs (name "") are skipped, so they
    # keep `inference_engines: null` on an uncached call and lack the key on a cached one: C++ quirk
    # kept so both states match the C++ server byte for byte (spec §9).
    for key in ("cpu", "amd_igpu", "npu"):
        if isinstance(devices.get(key), dict) and "name" in devices[key]:
            devices[key]["inference_engines"] = engines(key, devices[key]["name"])
    for key in ("amd_dgpu", "nvidia_dgpu"):
        for gpu in devices.get(key) or []:
            if isinstance(gpu, dict) and gpu.get("name"):  # a hand-edited cache must not 500
                gpu["inference_engines"] = engines(key, gpu["name"])
    family = _os_family()
    info: dict[str, Any] = {"OS Version": family}
    if family == "Linux":
        info["Processor"] = _linux_processor()
        info["Physical Memory"] = _linux_memory()
    elif family == "Windows":
        info.update(_windows_summary(devices))
    info["devices"] = devices
    if verbose:
        info["Python Packages"] = ["not-applicable"]
        return info
    return {k: info[k] for k in SUMMARY_KEYS if k in info}


def npu_available() -> bool:
    """Spec §7: the env override, else the cached/detected `npu.available` (always False on Linux)."""
    if path_utils.skip_processor_check():  # 1/ON/YES/TRUE in any case (C++: exactly 1, true, yes)
        return True
    if _os_family() != "Windows":
        return False  # Linux/macOS NPU is a fixed stub; skip detection on every registry lookup
    return bool(_hardware().get("npu", {}).get("available"))
