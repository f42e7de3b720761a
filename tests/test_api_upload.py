"""`POST /api/v{0,1}/add-local-model` (spec http-api §4.14): a real multipart upload of the gemma GGUF,
streamed to disk (server memory stays flat), registered, listed, loaded and chatted with, then deleted;
B's checks in B's order with B's messages; malformed bodies; nothing half-written left behind."""
from __future__ import annotations

import io
import json
from pathlib import Path

import psutil
import pytest
import requests

from api_support import (DEFAULT_MODEL, HELLO, raw_connection, read_response, request_bytes, running_server,
                         server_process)

BOUNDARY = "lemonadeTestBoundary7MA4YWxkTrZu0gW"
TIMEOUT = 300


class MultipartBody:
    """A multipart/form-data body read piece by piece (the GGUF is never held in memory). Only
    `read` and `__len__`: requests then sends a Content-Length (a `tell` would make it chunk)."""

    def __init__(self, fields: dict[str, str], files: list[tuple[str, Path | bytes]]):
        self.pieces: list[bytes | Path] = []
        for name, value in fields.items():
            self.pieces.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        for filename, content in files:
            self.pieces.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model_files"; '
                               f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode())
            self.pieces.append(content)
            self.pieces.append(b"\r\n")
        self.pieces.append(f"--{BOUNDARY}--\r\n".encode())
        self.length = sum(p.stat().st_size if isinstance(p, Path) else len(p) for p in self.pieces)
        self.current = None

    def __len__(self) -> int:
        return self.length

    def read(self, size: int = -1) -> bytes:
        size = 1 << 20 if size is None or size < 0 else size
        while self.pieces or self.current:
            if self.current is None:
                piece = self.pieces.pop(0)
                self.current = open(piece, "rb") if isinstance(piece, Path) else io.BytesIO(piece)
            data = self.current.read(size)
            if data:
                return data
            self.current.close()
            self.current = None
        return b""


def upload(server, fields: dict, files: list, content_type: str | None = None) -> requests.Response:
    body = MultipartBody(fields, files)
    headers = {"Content-Type": content_type or f"multipart/form-data; boundary={BOUNDARY}",
               "Content-Length": str(len(body))}
    return requests.post(server.api + "/add-local-model", data=body, headers=headers, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def server(tmp_path_factory, seeded_hub_cache, llama_server_bin):
    with running_server(tmp_path_factory.mktemp("upload"), seeded_hub_cache) as s:
        yield s


@pytest.fixture(scope="module")
def gguf(seeded_hub_cache) -> Path:
    return next(seeded_hub_cache.rglob("*.gguf"))


def hub(server) -> Path:
    return Path(server.env["HF_HUB_CACHE"])


def leftovers(server) -> list[Path]:
    return [p for p in hub(server).iterdir() if p.name.startswith(".upload-")]


def test_upload_real_gguf_then_chat_and_delete(server, gguf):
    proc = server_process(server)
    rss_before = proc.memory_info().rss
    fields = {"model_name": "user.Uploaded", "checkpoint": "", "recipe": "llamacpp", "reasoning": "True",
              "vision": "0", "mmproj": ""}
    reply = upload(server, fields, [("my-folder/gemma-3-270m-q4_k_m.gguf", gguf), ("my-folder/README.md", b"# hi\n")])
    assert reply.status_code == 200
    assert reply.content == b'{"message":"Model user.Uploaded uploaded and registered successfully","status":"success"}'
    # Streamed to disk: the server never held the 240 MB file.
    assert proc.memory_info().rss - rss_before < 64 * 1024 * 1024
    target = hub(server) / "models--Uploaded"
    stored = target / "gemma-3-270m-q4_k_m.gguf"
    assert stored.stat().st_size == gguf.stat().st_size and (target / "README.md").read_bytes() == b"# hi\n"
    assert not leftovers(server)
    registry = json.loads((Path(server.env["LEMONADE_CACHE_DIR"]) / "user_models.json").read_text())
    entry = registry["Uploaded"]
    assert entry["checkpoint"] == "models--Uploaded/gemma-3-270m-q4_k_m.gguf"  # relative to the HF cache
    assert entry["recipe"] == "llamacpp" and entry["labels"] == ["custom", "reasoning"]
    assert entry["source"] == "local_upload" and entry["suggested"] is True
    listed = {m["id"]: m for m in requests.get(server.api + "/models").json()["data"]}
    assert listed["user.Uploaded"]["checkpoint"] == "models--Uploaded/gemma-3-270m-q4_k_m.gguf"

    reply = requests.post(server.api + "/chat/completions", timeout=TIMEOUT,
                          json={"model": "user.Uploaded", "messages": HELLO, "max_tokens": 4})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] > 0
    assert str(stored) in " ".join(server.llama_processes()[0].cmdline())

    # Name taken now: 409 (checked after the files arrived, as in C++), and nothing is left behind.
    reply = upload(server, fields, [("x/tiny.gguf", b"GGUF")])
    assert reply.status_code == 409
    assert reply.json() == {"error": "Model name 'user.Uploaded' already exists. Please use a different name."}
    assert not leftovers(server) and stored.exists()

    requests.post(server.api + "/unload", timeout=TIMEOUT)
    reply = requests.post(server.api + "/delete", json={"model": "user.Uploaded"}, timeout=TIMEOUT)
    assert reply.status_code == 200 and not target.exists()
    assert requests.get(server.api + "/models/user.Uploaded").status_code == 404


def test_junk_gguf_fails_to_start_with_the_real_cause(server):
    """llama-server exits on a file that is not a GGUF. B's chat answers the generic 404 "endpoint does
    not exist"; we answer 500 process_error with llama-server's exit code. Its output goes to the
    server log, not into the answer: it quotes the file's first bytes ("invalid magic characters") and
    absolute paths (issue 15 item 3)."""
    reply = upload(server, {"model_name": "user.Junk", "recipe": "llamacpp"}, [("junk.gguf", b"SECRET-BYTES" * 100)])
    assert reply.status_code == 200
    reply = requests.post(server.api + "/chat/completions", timeout=TIMEOUT,
                          json={"model": "user.Junk", "messages": HELLO, "max_tokens": 4})
    assert reply.status_code == 500
    error = reply.json()["error"]
    assert error["type"] == "process_error"
    assert error["message"].startswith("llama-server failed to start: process exited with code ")
    assert "SECR" not in reply.text and server.env["HF_HUB_CACHE"] not in reply.text
    assert error["message"].endswith("(its output is in the server log)")
    assert "exited with code" in server.log_text() and "[llama-server]" in server.log_text()
    assert not server.llama_processes()


@pytest.mark.parametrize("fields,files,status,message", [
    ({"recipe": "llamacpp"}, [("a.gguf", b"G")], 400, "model_name and recipe are required"),
    ({"model_name": "user.A"}, [("a.gguf", b"G")], 400, "model_name and recipe are required"),
    ({"model_name": "A", "recipe": "llamacpp"}, [("a.gguf", b"G")], 400, "Model name must start with 'user.'"),
    ({"model_name": "user.A", "recipe": "flm"}, [("a.gguf", b"G")], 400,
     "Invalid recipe. Must be one of: llamacpp, oga-npu, oga-hybrid, oga-cpu"),
    ({"model_name": "user.A", "recipe": "llamacpp"}, [], 400, "No model files provided for upload"),
    ({"model_name": "user.A", "recipe": "llamacpp"}, [("d/readme.txt", b"x")], 400,
     "At least one .gguf file is required for llamacpp"),
    ({"model_name": f"user.{DEFAULT_MODEL}", "recipe": "llamacpp"}, [("a.gguf", b"G")], 200, None),
    ({"model_name": "user.B", "recipe": "llamacpp"}, [("../../escape.gguf", b"G")], 400,
     "Invalid file name in upload: ../../escape.gguf"),
])
def test_checks_in_cpp_order(server, fields, files, status, message):
    reply = upload(server, fields, files)
    assert reply.status_code == status, reply.text
    if message:
        assert reply.json() == {"error": message}
    assert not leftovers(server)
    assert not any(p.name == "escape.gguf" for p in hub(server).parent.rglob("escape.gguf"))


LONG = "x" * 300 + ".gguf"


@pytest.mark.parametrize("files, message", [
    ([("d/a\0b.gguf", b"G")], "Invalid file name in upload (NUL character): 'd/a\\x00b.gguf'"),
    ([("d/" + LONG, b"G")], "File name in upload longer than 255 bytes: " + ("d/" + LONG)[:100] + "…"),
    ([("d/a.gguf", b"G"), ("d/a.gguf/b.gguf", b"G")],
     "File name in upload clashes with another file or folder of it: a.gguf/b.gguf"),
    ([("d/a/b.gguf", b"G"), ("d/a", b"G")], "File name in upload clashes with another file or folder of it: a"),
    ([("d/a.gguf", b"G"), ("d/a.gguf", b"H")], "File name in upload clashes with another file or folder of it: a.gguf"),
])
def test_file_names_no_disk_can_hold_are_400(server, files, message):
    """Issue 15 item 12: these were 500s (the OS refused them mid-upload)."""
    reply = upload(server, {"model_name": "user.Names", "recipe": "llamacpp"}, files)
    assert reply.status_code == 400, reply.text
    assert reply.json() == {"error": message}
    assert not leftovers(server) and not (hub(server) / "models--Names").exists()
    assert requests.get(server.api + "/health", timeout=10).status_code == 200


def test_upload_never_replaces_a_hub_download(server, gguf):
    """Issue 15 item 1: `user.org--repo` maps onto the cache folder `models--org--repo`; C++ B deletes
    that folder and puts the upload in its place. The hub download must stay whole and usable."""
    folder = hub(server) / "models--hugginllam--gemma-3-270m-Q4_K_M-GGUF"
    before = sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*"))
    reply = upload(server, {"model_name": "user.hugginllam--gemma-3-270m-Q4_K_M-GGUF", "recipe": "llamacpp"},
                   [("d/tiny.gguf", b"GGUF" * 10)])
    assert reply.status_code == 409
    assert reply.json() == {"error": "Model name 'user.hugginllam--gemma-3-270m-Q4_K_M-GGUF' maps onto the "
                                     "existing cache folder models--hugginllam--gemma-3-270m-Q4_K_M-GGUF; "
                                     "please use a different name."}
    assert sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*")) == before
    assert not leftovers(server)
    reply = requests.post(server.api + "/chat/completions", timeout=TIMEOUT,
                          json={"model": DEFAULT_MODEL, "messages": HELLO, "max_tokens": 4})
    assert reply.status_code == 200 and reply.json()["choices"]


def test_not_multipart(server):
    for content_type in ("application/json", "multipart/form-data", "text/plain"):
        reply = requests.post(server.api + "/add-local-model", data=b'{"model_name": "user.x"}',
                              headers={"Content-Type": content_type}, timeout=TIMEOUT)
        assert reply.status_code == 400 and reply.json() == {"error": "Request must be multipart/form-data"}


@pytest.mark.parametrize("body", [
    b"garbage without any delimiter",
    f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model_name\"\r\n\r\nuser.T".encode(),  # truncated
    f"--{BOUNDARY}\r\nX-No-Disposition: y\r\n\r\nv\r\n--{BOUNDARY}--\r\n".encode(),
    f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model_files\"; filename=\"a.gguf\"\r\n\r\n".encode()
    + b"\x00" * 5000,  # file part that never ends
])
def test_malformed_multipart_then_keep_serving(server, body):
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    with raw_connection(server.port) as sock:
        sock.sendall(request_bytes("POST", "/api/v1/add-local-model", body, headers))
        response = read_response(sock, "POST")
    assert response.status == 400 and "error" in json.loads(response.body)
    assert not leftovers(server)
    assert requests.get(server.api + "/health").status_code == 200


def test_keep_alive_after_upload(server):
    """The whole body (epilogue included) is consumed, so the connection serves the next request."""
    parts = MultipartBody({"model_name": "user.KA", "recipe": "llamacpp"}, [("ka.gguf", b"GGUF")])
    body = b"".join(iter(parts.read, b""))
    body += b"epilogue that the parser must drain\r\n"
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    with raw_connection(server.port) as sock:
        sock.sendall(request_bytes("POST", "/api/v1/add-local-model", body, headers))
        first = read_response(sock, "POST")
        assert first.status == 200 and first.getheader("Connection") is None
        sock.sendall(request_bytes("GET", "/api/v1/models/user.KA"))
        second = read_response(sock)
    assert second.status == 200 and json.loads(second.body)["id"] == "user.KA"


def test_chunked_upload_needs_length(server):
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", "Transfer-Encoding": "chunked"}
    reply = requests.post(server.api + "/add-local-model", data=iter([b"--", BOUNDARY.encode()]), headers=headers,
                          timeout=TIMEOUT)
    assert reply.status_code == 411 and reply.json() == {"error": "Uploads need a Content-Length"}
    assert psutil.pid_exists(server.proc.pid)
