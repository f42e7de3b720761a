#!/usr/bin/env python3
"""A stand-in `llama-server` for measuring the router alone (bench/proxy_overhead.py `--stand-in`).

It takes llama-server's command line (only `--port` matters), answers `/health` at once and every POST
with a fixed llama-server-shaped chat completion after `$LEMONADE_STAND_IN_DELAY_MS` (default 25 ms,
about what the real one takes for a 1-token chat of the embedded model here). The delay matters: a
router that idles between requests runs its code cold, which is most of what it adds on this machine;
a stand-in that answers at once would hide that. Raw sockets and one thread per connection, so its own
cost is the same for direct and proxied requests and drops out of the difference.
"""
import json
import os
import socket
import sys
import threading
import time

DELAY = float(os.environ.get("LEMONADE_STAND_IN_DELAY_MS", "25")) / 1000.0
COMPLETION = json.dumps({
    "choices": [{"finish_reason": "length", "index": 0,
                 "message": {"role": "assistant", "content": "A"}}],
    "created": 1, "model": "stand-in", "object": "chat.completion", "id": "chatcmpl-stand-in",
    "system_fingerprint": "stand-in",
    "usage": {"completion_tokens": 1, "prompt_tokens": 9, "total_tokens": 10},
    "timings": {"prompt_n": 9, "prompt_ms": 20.0, "prompt_per_token_ms": 2.2, "prompt_per_second": 450.0,
                "predicted_n": 1, "predicted_ms": 5.0, "predicted_per_token_ms": 5.0,
                "predicted_per_second": 200.0},
}).encode()
HEALTH = b'{"status":"ok"}'


def answer(body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
            b"Keep-Alive: timeout=5, max=100\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def serve(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = conn.makefile("rb")
    try:
        while True:
            request_line = reader.readline()
            if not request_line:
                return
            length = 0
            while True:
                line = reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            reader.read(length)
            if request_line.startswith(b"POST"):
                time.sleep(DELAY)
                conn.sendall(answer(COMPLETION))
            else:
                conn.sendall(answer(HEALTH))
    except OSError:
        return
    finally:
        reader.close()
        conn.close()


def main() -> None:
    port = int(sys.argv[sys.argv.index("--port") + 1])
    listener = socket.create_server(("127.0.0.1", port))
    print(f"stand-in llama-server listening on 127.0.0.1:{port}", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
