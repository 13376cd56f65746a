"""A real HTTP/1.1 server on 127.0.0.1 that answers like OpenAI, Azure OpenAI, Anthropic and Gemini,
replaying the bodies in this folder (see README.md), including SSE streams.

Test controls, sent as request headers (they are not X-Spendstream-* headers, so they do reach it),
or as query parameters `replay_cut=N` / `replay_status=S` (which pass through the gateway, whose
headers do not):
    x-replay-cut: N      send the first N events of a stream, then drop the connection
    x-replay-status: S   answer S with the provider's error body
    x-replay-gzip: 1     gzip the response body (Content-Encoding: gzip)
Every request is recorded (method, path, headers, body) in `server.requests`.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SPEECH_BYTES = b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(range(256)) * 8


def fixture(name: str) -> bytes:
    return (HERE / name).read_bytes()


def sse_events(name: str) -> list[bytes]:
    """The events of a .sse fixture, each with its terminating blank line."""
    text = fixture(name).replace(b"\r\n", b"\n")
    return [block.strip(b"\n") + b"\n\n" for block in text.split(b"\n\n") if block.strip()]


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body leave in separate writes: no 40 ms delayed-ACK stalls
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        body = self._body()
        path, _, query = self.path.partition("?")
        headers = {k.lower(): v for k, v in self.headers.items()}
        for name, _, value in (p.partition("=") for p in query.split("&") if p.startswith("replay_")):
            headers[name.replace("_", "-", 1).replace("replay-", "x-replay-")] = value
        self.server.recorded.append(Recorded(method, self.path, headers, body))
        status = int(headers.get("x-replay-status", "200"))
        if status >= 400:
            self._error(status, path)
            return
        try:
            doc = json.loads(body) if body and "json" in headers.get("content-type", "") else {}
        except ValueError:
            doc = {}
        self._route(method, path, doc, body, headers)

    def _route(
        self, method: str, path: str, doc: dict[str, Any], body: bytes, headers: dict[str, str]
    ) -> None:
        stream = doc.get("stream") is True
        cut = int(headers["x-replay-cut"]) if "x-replay-cut" in headers else None
        gz = headers.get("x-replay-gzip") == "1"
        if method == "POST" and path.endswith("/chat/completions"):
            if stream:
                events = sse_events("openai_chat_stream.sse")
                if not (doc.get("stream_options") or {}).get("include_usage"):
                    events = [e for e in events if b'"usage"' not in e]
                return self._sse(events, cut)
            name = "azure_chat.json" if "/openai/deployments/" in path else "openai_chat.json"
            return self._json(fixture(name), gz)
        if method == "POST" and path.endswith("/responses"):
            if stream:
                return self._sse(sse_events("openai_responses_stream.sse"), cut)
            return self._json(fixture("openai_responses.json"), gz)
        if method == "POST" and path.endswith("/embeddings"):
            return self._json(fixture("openai_embeddings.json"), gz)
        if method == "POST" and path.endswith("/audio/transcriptions"):
            name = (
                "openai_transcription_whisper.json" if b"whisper-1" in body else "openai_transcription.json"
            )
            return self._json(fixture(name), gz)
        if method == "POST" and path.endswith("/audio/speech"):
            return self._send(200, SPEECH_BYTES, "audio/mpeg")
        if method == "POST" and path.endswith("/images/generations"):
            name = "openai_images_dalle.json" if doc.get("model") == "dall-e-3" else "openai_images.json"
            return self._json(fixture(name), gz)
        if method == "POST" and path.endswith("/batches"):
            return self._json(json.dumps(_openai_batch(doc)).encode(), gz)
        if method == "GET" and path.endswith("/content") and "/files/" in path:
            return self._send(200, fixture("openai_batch_output.jsonl"), "application/octet-stream")
        if method == "POST" and path.endswith("/messages"):
            if stream:
                return self._sse(sse_events("anthropic_messages_stream.sse"), cut)
            return self._json(fixture("anthropic_messages.json"), gz)
        if method == "GET" and "/messages/batches/" in path and path.endswith("/results"):
            return self._send(200, fixture("anthropic_batch_results.jsonl"), "application/binary")
        if method == "GET" and "/messages/batches/" in path:
            base = f"http://{headers.get('host', '127.0.0.1')}"
            return self._json(json.dumps(_anthropic_batch(path.rsplit("/", 1)[1], base)).encode(), gz)
        if method == "POST" and path.endswith(":generateContent"):
            return self._json(fixture("gemini_generate.json"), gz)
        if method == "POST" and path.endswith(":streamGenerateContent"):
            return self._sse(sse_events("gemini_stream.sse"), cut)
        if method == "GET" and path.endswith("/models"):
            models = ("gpt-4o-mini", "gpt-4o", "o3", "text-embedding-3-small")
            data = [{"id": m, "object": "model", "created": 1715367049, "owned_by": "system"} for m in models]
            return self._json(json.dumps({"object": "list", "data": data}).encode(), gz)
        return self._error(404, path)

    def _error(self, status: int, path: str) -> None:
        if path.endswith("/messages"):
            body = {"type": "error", "error": {"type": "api_error", "message": "replayed failure"}}
        elif ":" in path.rsplit("/", 1)[-1]:
            body = {"error": {"code": status, "message": "replayed failure", "status": "INTERNAL"}}
        else:
            body = {
                "error": {"message": "replayed failure", "type": "server_error", "param": None, "code": None}
            }
        self._send(status, json.dumps(body).encode(), "application/json")

    def _json(self, body: bytes, gz: bool = False) -> None:
        self._send(200, body, "application/json", gz)

    def _send(self, status: int, body: bytes, ctype: str, gz: bool = False) -> None:
        self.send_response(status)
        self.send_header("content-type", ctype)
        if gz:
            body = gzip.compress(body)
            self.send_header("content-encoding", "gzip")
        self.send_header("content-length", str(len(body)))
        self.send_header("x-request-id", "req_replay")
        self.end_headers()
        self.wfile.write(body)

    def _sse(self, events: list[bytes], cut: int | None) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("transfer-encoding", "chunked")
        self.send_header("cache-control", "no-cache")
        self.end_headers()
        for i, event in enumerate(events):
            if cut is not None and i >= cut:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)  # drop mid-stream: no terminating chunk
                self.close_connection = True
                return
            self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")


def _openai_batch(doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "batch_abc123",
        "object": "batch",
        "endpoint": doc.get("endpoint", "/v1/chat/completions"),
        "errors": None,
        "input_file_id": doc.get("input_file_id", "file-abc123"),
        "completion_window": "24h",
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": 1711471533,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": None,
    }


def _anthropic_batch(batch_id: str, base: str) -> dict[str, Any]:
    return {
        "id": batch_id,
        "type": "message_batch",
        "processing_status": "ended",
        "request_counts": {"processing": 0, "succeeded": 2, "errored": 0, "canceled": 0, "expired": 0},
        "ended_at": "2024-08-20T18:37:24.100435Z",
        "created_at": "2024-08-20T18:37:24.100435Z",
        "expires_at": "2024-08-21T18:37:24.100435Z",
        "archived_at": None,
        "cancel_initiated_at": None,
        "results_url": f"{base}/v1/messages/batches/{batch_id}/results",
    }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    recorded: list[Recorded]

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up mid-stream are part of the tests


class ReplayServer:
    """`with ReplayServer() as server:` -> `server.url` (http://127.0.0.1:PORT), `server.requests`."""

    def __init__(self) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.recorded = []
        self._thread = threading.Thread(target=self._server.serve_forever, name="replay", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def requests(self) -> list[Recorded]:
        return self._server.recorded

    def start(self) -> ReplayServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ReplayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
