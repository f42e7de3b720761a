"""A stand-in for the `flm` executable (FastFlowLM needs an AMD NPU, which test machines lack).

Tests call `install(bin_dir, state_dir)`, which writes this file as an executable `bin_dir/flm` with a
`#!<sys.executable>` line. It speaks the CLI lemonade uses:

  flm version                               → `FLM v0.9.4`
  flm list                                  → `Models:` then `  - <ckpt> ✅` (installed) / `⏬` (known)
  flm pull <ckpt> [--force]                 → marks <ckpt> installed (or fails, see below)
  flm remove <ckpt>                         → marks <ckpt> not installed
  flm serve <ckpt> --ctx-len N --port P     → OpenAI-compatible HTTP server on 127.0.0.1:P

State lives in `$FLM_STANDIN_DIR`:
  state.json     {"installed": [...], "known": [...], "pull_exit_code": 0, "remove_exit_code": 0,
                  "hang": [<commands that sleep forever, e.g. "pull">]}
  calls.jsonl    one line per invocation: {"argv": [...], "pid": N}
  requests.jsonl one line per HTTP request the server got: {"path": ..., "model": ..., "stream": ...}

Fault modes of `serve`, from `$FLM_STANDIN_FAULT`: `exit` (print an error, exit 3 before listening),
`hang` (listen but never answer). The server echoes the `model` it received in every answer.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

VERSION = "0.9.4"
ENV_DIR = "FLM_STANDIN_DIR"
ENV_FAULT = "FLM_STANDIN_FAULT"
EXIT_FAULT_CODE = 3
PROMPT_TOKENS, STREAM_PROMPT_TOKENS = 7, 11  # distinct, so a test can tell which answer set /stats
USAGE_EXTRA = {"load_duration": 0.5, "prefill_duration_ttft": 0.125, "prefill_speed_tps": 200.0,
               "decoding_duration": 0.25, "decoding_speed_tps": 42.5}  # FLM's usage fields


def install(bin_dir: Path, state_dir: Path, installed: list[str] = (), known: list[str] = ()) -> Path:
    """Write the `flm` executable into `bin_dir` and its initial state into `state_dir`."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "flm"
    # -IS: stdlib only, no site-packages scan, so each CLI call starts fast (lemonade runs `flm list` often)
    exe.write_text(f"#!{sys.executable} -IS\n" + Path(__file__).read_text())
    exe.chmod(0o755)
    write_state(state_dir, {"installed": list(installed), "known": list(known),
                            "pull_exit_code": 0, "remove_exit_code": 0, "hang": []})
    return exe


def read_state(state_dir: Path) -> dict:
    return json.loads((state_dir / "state.json").read_text())


def write_state(state_dir: Path, state: dict) -> None:
    tmp = state_dir / "state.json.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, state_dir / "state.json")


def read_jsonl(state_dir: Path, name: str) -> list[dict]:
    path = state_dir / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _append(state_dir: Path, name: str, record: dict) -> None:
    with open(state_dir / name, "a") as f:  # one short write per line: safe enough across processes
        f.write(json.dumps(record) + "\n")


# -- the HTTP server of `flm serve` ---------------------------------------------------------------

def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion, **USAGE_EXTRA}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # close-delimited bodies: simplest correct SSE framing
    state_dir: Path
    checkpoint: str

    def log_message(self, fmt: str, *args) -> None:
        sys.stderr.write("flm-standin: " + fmt % args + "\n")

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/api/tags":
            self._json(200, {"models": [{"name": self.checkpoint, "model": self.checkpoint}]})
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        model = body.get("model")
        _append(self.state_dir, "requests.jsonl",
                {"path": self.path, "model": model, "stream": bool(body.get("stream"))})
        if self.path == "/v1/chat/completions":
            self._completion(body, model, chat=True)
        elif self.path == "/v1/completions":
            self._completion(body, model, chat=False)
        elif self.path == "/v1/embeddings":
            inputs = body.get("input")
            inputs = inputs if isinstance(inputs, list) else [inputs]
            self._json(200, {"object": "list", "model": model, "usage": _usage(len(inputs), 0),
                             "data": [{"object": "embedding", "index": i, "embedding": [0.25, 0.5, float(i)]}
                                      for i in range(len(inputs))]})
        elif self.path == "/v1/rerank":
            docs = body.get("documents") or []
            self._json(200, {"model": model, "object": "list",
                             "results": [{"index": i, "relevance_score": 1.0 / (i + 1)} for i in range(len(docs))]})
        else:
            self._json(404, {"error": "not found"})

    def _completion(self, body: dict, model: str, chat: bool) -> None:
        words = ["Hello", " from", " the", " NPU", "!"]
        kind = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            text = "".join(words)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                      if chat else {"index": 0, "text": text, "finish_reason": "stop"})
            self._json(200, {"id": "flm-1", "object": kind, "created": int(time.time()), "model": model,
                             "choices": [choice], "usage": _usage(PROMPT_TOKENS, len(words))})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for word in words + [None]:  # None: the closing frame, which carries the usage
            finish = None if word else "stop"
            choice = ({"index": 0, "delta": {"content": word} if word else {}, "finish_reason": finish}
                      if chat else {"index": 0, "text": word or "", "finish_reason": finish})
            frame = {"id": "flm-1", "object": kind + ".chunk", "created": int(time.time()), "model": model,
                     "choices": [choice]}
            if word is None:
                frame["usage"] = _usage(STREAM_PROMPT_TOKENS, len(words))
            self.wfile.write(b"data: " + json.dumps(frame).encode() + b"\n\n")
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")


def _serve(state_dir: Path, argv: list[str]) -> int:
    if len(argv) != 5 or argv[1] != "--ctx-len" or argv[3] != "--port" or not argv[2].isdigit():
        print(f"usage: flm serve <model> --ctx-len N --port P (got {argv})", file=sys.stderr)
        return 2
    checkpoint, port = argv[0], int(argv[4])
    fault = os.environ.get(ENV_FAULT, "")
    if fault == "exit":
        print("Error: no NPU device found", file=sys.stderr)
        return EXIT_FAULT_CODE
    if checkpoint not in read_state(state_dir)["installed"]:
        print(f"Error: model {checkpoint} is not pulled", file=sys.stderr)
        return 1
    if fault == "hang":
        with socket.create_server(("127.0.0.1", port)):  # accepts connections, never answers
            while True:
                time.sleep(3600)
    handler = type("Handler", (_Handler,), {"state_dir": state_dir, "checkpoint": checkpoint})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    print(f"FLM serving {checkpoint} on port {port}", flush=True)
    server.serve_forever()
    return 0


# -- the CLI --------------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    state_dir = Path(os.environ[ENV_DIR])
    _append(state_dir, "calls.jsonl", {"argv": argv, "pid": os.getpid()})
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    state = read_state(state_dir)
    if command in state["hang"]:  # a CLI command that never finishes (tests of the bounded waits)
        while True:
            time.sleep(3600)
    if command == "version":
        print(f"FLM v{VERSION}")
        return 0
    if command == "list":
        print("Models:")
        for ckpt in sorted(set(state["installed"]) | set(state["known"])):
            print(f"  - {ckpt} {'✅' if ckpt in state['installed'] else '⏬'}")
        return 0
    if command == "pull" and rest and set(rest[1:]) <= {"--force"}:
        if state["pull_exit_code"]:
            print(f"Error: failed to download {rest[0]}", file=sys.stderr)
            return state["pull_exit_code"]
        state["installed"] = sorted(set(state["installed"]) | {rest[0]})
        write_state(state_dir, state)
        print(f"Pulled {rest[0]}")
        return 0
    if command == "remove" and len(rest) == 1:
        if state["remove_exit_code"]:
            return state["remove_exit_code"]
        state["installed"] = [c for c in state["installed"] if c != rest[0]]
        write_state(state_dir, state)
        return 0
    if command == "serve":
        return _serve(state_dir, rest)
    print(f"flm: unknown command {argv}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
