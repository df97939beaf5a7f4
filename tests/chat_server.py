"""An OpenAI-compatible chat-completions server on 127.0.0.1, for enhance_prompt's endpoint
backend: it answers as such endpoints do, or fails as they do.

POST /v1/chat/completions answers with `rewrite_of(prompt)` for the last user message, in
the chat-completions shape (choices[0].message.content, finish_reason "stop"). `fault`
makes every answer fail instead: "slow" (answers after `delay` s), "500", "garbage" (a 200
whose body is not JSON), "empty" (content ""), "cut" (finish_reason "length"), "redirect"
(302 to another address), "trickle" (headers a byte every 0.2 s), "deep" (JSON nested past
Python's recursion limit), "long" (a 12,000-character rewrite, max_tokens ignored),
"invisible" (zero-width spaces), "echo" (401 quoting the request's Authorization header);
quoting it too: "echo-page" (a 200 whose body is an HTML error page, as a proxy's),
"echo-json" (a 200 with an error instead of choices), "echo-late" (401, the quote straddling
the 300th character, where our message cuts an error's text); "refuse" (an apology where the
caption should be), "refusal" (no content, an OpenAI `refusal` field instead), "echo-refusal" (a
`refusal` field quoting the Authorization header across its 300th character), "echo-apology"
(the same quote in an apology where the caption should be), "verbatim"
(the user's prompt as it came, as a model that finds it detailed enough may answer),
"half-emoji" (an emoji's first UTF-16 half, alone, before the rewrite's last full stop, as
a gateway that cuts a JavaScript string sends it), "quoted-cut" (the rewrite in quotes, cut by
the cap before its closing one); a reasoning model served without a reasoning parser: "think"
(its thoughts in <think> tags before the rewrite, as Qwen3's), "think-open" (only the closing
tag, the template having opened it, as DeepSeek-R1's), "think-cut" (still thinking at the cap);
"filtered" (the rewrite cut short by the provider's content filter: finish_reason
"content_filter", as Azure OpenAI answers); "no-choices" (a 200 whose choice list is empty),
"completion" (a choice in the older completions shape: `text`, no `message`), "endless" (a
200 whose body never ends), "padded" (the answer padded with blanks to MAX_ANSWER_BYTES, the
size our client takes), "blank-refusal" (the rewrite beside an empty `refusal` field),
"echo-finish" (no text, and a finish_reason quoting the Authorization header), "400" (a bad
request, in the endpoint's words), "redirect-300" and "redirect-308" (as "redirect", with
that status), "endless-error" (a 500 whose body never ends), "reset-error" (a 500 whose body
a connection reset breaks off), "wide-echo" (a 500 in four-byte characters, the request's key
from its 298th), "trickle-body" (a 200 whose body comes a byte every 0.05 s, never in full),
"stall-body" (a 200 whose body stops after its first byte); `hung_up` is set once the client
closes the connection of one of these last two;
broken HTTP: "not-http" (a line from another protocol, as a wrong port gives), "cut-body" (a
200 whose chunked body breaks off), "cut-error" (a 500 whose chunked body breaks off);
"bare-choice" (a choice that is a bare string, not an object); a reasoning model again:
"think-twice" (two blocks of thoughts before the rewrite), "blank-think-cut" (as "think-cut",
after blank lines), "think-done-cut" (its thoughts closed just at the cap, no rewrite after).
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cogvideox_cog.prompts.endpoint import MAX_ANSWER_BYTES

FAULTS = (
    "slow", "500", "garbage", "empty", "cut", "redirect", "trickle", "deep", "long", "invisible",
    "echo", "echo-page", "echo-json", "echo-late", "refuse", "refusal", "echo-refusal",
    "echo-apology", "verbatim", "half-emoji", "no-choices", "completion", "endless", "not-http",
    "cut-body", "cut-error", "quoted-cut", "think", "think-open", "think-cut", "filtered",
    "padded", "blank-refusal", "echo-finish", "400", "redirect-300", "redirect-308",
    "endless-error", "reset-error", "wide-echo", "trickle-body", "stall-body", "bare-choice",
    "think-twice", "blank-think-cut", "think-done-cut",
)  # fmt: skip
REDIRECTS = {"redirect": 302, "redirect-300": 300, "redirect-308": 308}
WIDE = "\U0001f600"  # four bytes in UTF-8


REFUSAL = "I'm sorry, but I can't help with that request."
THOUGHTS = (
    "Okay, the user wants a detailed caption for a short idea. I should describe the subject, "
    "the light and the camera."
)


# Answered with another finish_reason than "stop": the cap's, or the content filter's.
FINISH_REASONS = {
    "cut": "length",
    "quoted-cut": "length",
    "think-cut": "length",
    "blank-think-cut": "length",
    "think-done-cut": "length",
    "filtered": "content_filter",
}


def rewrite_of(prompt: str) -> str:
    """What this server's "model" writes for a prompt: longer, and recognisably from it."""
    return (
        f"A detailed, cinematic shot of {prompt}. Soft morning light falls across the scene, "
        f"and the camera slowly moves closer."
    )


class ChatServer:
    def __init__(self, fault: str | None = None, delay: float = 3.0) -> None:
        self.fault, self.delay = fault, delay
        self.requests: list[dict[str, Any]] = []  # {"path", "headers", "body"} per POST
        self.hung_up = threading.Event()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with peer._lock:
                    peer.requests.append({"path": self.path, "headers": headers, "body": raw})
                    fault = peer.fault
                if self.path.partition("?")[0] != "/v1/chat/completions":
                    self._send(404, b'{"error": {"message": "no such route"}}')
                elif fault == "500":
                    self._send(500, b'{"error": {"message": "the model crashed"}}')
                elif fault == "garbage":
                    self._send(200, b"<html>502 Bad Gateway</html>")
                elif fault in REDIRECTS:
                    elsewhere = {"Location": "http://127.0.0.1:9/v1/chat/completions"}
                    self._send(REDIRECTS[fault], b"", elsewhere)
                elif fault == "400":
                    self._send(400, b'{"error": {"message": "max_tokens is too large"}}')
                elif fault == "endless-error":
                    self._endless(b" " * (64 << 10), status=500)
                elif fault == "reset-error":
                    head = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 1000\r\n\r\n"
                    self._reset_after(head + b'{"error": ')
                elif fault == "wide-echo":
                    key = headers.get("authorization", "").removeprefix("Bearer ")
                    self._send(500, (WIDE * 297 + key + WIDE * 10).encode())
                elif fault in ("trickle-body", "stall-body"):
                    self._body_then_wait(every=0.05 if fault == "trickle-body" else None)
                elif fault == "echo":
                    quoted = json.dumps({"error": f"bad key in {headers['authorization']}"})
                    self._send(401, quoted.encode())
                elif fault == "echo-page":
                    page = f"<html><p>Bad header: {headers['authorization']}</p></html>"
                    self._send(200, page.encode())
                elif fault == "echo-json":
                    quoted = json.dumps({"error": f"bad key in {headers['authorization']}"})
                    self._send(200, quoted.encode())
                elif fault == "echo-late":
                    padding = "x" * (300 - len('{"error": "Bearer ') - 3)
                    quoted = json.dumps({"error": padding + headers["authorization"]})
                    self._send(401, quoted.encode())
                elif fault == "deep":
                    self._send(200, b"[" * 100_000 + b"]" * 100_000)
                elif fault == "no-choices":
                    self._send(200, b'{"id": "chatcmpl-test", "choices": []}')
                elif fault == "bare-choice":
                    self._send(200, b'{"choices": ["A cat."]}')
                elif fault == "completion":
                    choice = {"index": 0, "text": "A cat.", "finish_reason": "stop"}
                    self._send(200, json.dumps({"choices": [choice]}).encode())
                elif fault == "endless":
                    self._endless(b" " * (64 << 10))  # blanks, as before a JSON value
                elif fault == "not-http":
                    self._raw(b"SSH-2.0-OpenSSH_9.6\r\n")
                elif fault in ("cut-body", "cut-error"):
                    status = "200 OK" if fault == "cut-body" else "500 Internal Server Error"
                    head = f"HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\n\r\n"
                    self._raw(head.encode() + b'100\r\n{"choices": [')
                elif fault == "trickle":
                    self._trickle(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
                else:
                    if fault == "slow":
                        peer._stopped.wait(peer.delay)
                    answer = peer._answer(json.loads(raw), fault, headers.get("authorization"))
                    body = json.dumps(answer).encode()
                    self._send(200, body.ljust(MAX_ANSWER_BYTES) if fault == "padded" else body)

            def _trickle(self, head: bytes) -> None:
                for byte in head:
                    if peer._stopped.wait(0.2):
                        return
                    try:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                    except OSError:  # the client gave up
                        return

            def _endless(self, block: bytes, status: int = 200) -> None:
                """`status` without a length, `block` after `block` until the client hangs up."""
                self.close_connection = True
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                with contextlib.suppress(OSError):  # the client gave up
                    while not peer._stopped.is_set():
                        self.wfile.write(block)

            def _body_then_wait(self, every: float | None) -> None:
                """A 200 whose body never comes in full: a byte every `every` s, or none after
                its first (None), until the client hangs up (`peer.hung_up`)."""
                self.close_connection = True
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(MAX_ANSWER_BYTES))
                self.end_headers()
                try:
                    self.wfile.write(b"{")
                    while not peer._stopped.is_set():
                        closed, _, _ = select.select([self.connection], [], [], every or 0.05)
                        if closed and not self.connection.recv(1):
                            break
                        if every:
                            self.wfile.write(b" ")
                    else:
                        return
                except OSError:
                    pass
                peer.hung_up.set()

            def _reset_after(self, answer: bytes) -> None:
                """`answer`, then the connection reset (not closed) a moment later."""
                self.close_connection = True
                with contextlib.suppress(OSError):  # the client gave up
                    self.wfile.write(answer)
                    peer._stopped.wait(0.2)
                    linger = struct.pack("ii", 1, 0)  # close() then sends a reset
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    self.connection.close()

            def _raw(self, answer: bytes) -> None:
                """`answer` as it is, then the connection closed."""
                self.close_connection = True
                with contextlib.suppress(OSError):  # the client gave up
                    self.wfile.write(answer)

            def _send(self, status: int, body: bytes, extra: dict | None = None) -> None:
                try:
                    self.send_response(status)
                    for name, value in (extra or {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up (a timeout)
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def _answer(self, request: dict, fault: str | None, authorization: str | None) -> dict:
        prompt = [m for m in request["messages"] if m["role"] == "user"][-1]["content"]
        content = "" if fault == "empty" else rewrite_of(prompt)
        if fault == "long":
            content = (rewrite_of(prompt) + " ") * 100
        elif fault == "invisible":
            content = "\u200b\u200b"
        elif fault == "refuse":
            content = REFUSAL
        elif fault == "verbatim":
            content = prompt
        elif fault == "half-emoji":
            content = content[:-1] + "\ud83d."
        elif fault == "think":
            content = f"<think>\n{THOUGHTS}\n</think>\n\n{content}"
        elif fault == "think-open":
            content = f"{THOUGHTS}\n</think>\n\n{content}"
        elif fault == "think-twice":
            second = "<think>\nOn second thought, the light should be warmer.\n</think>"
            content = f"<think>\n{THOUGHTS}\n</think>\n{second}\n\n{content}"
        elif fault == "think-cut":
            content = f"<think>\n{THOUGHTS} Then the"
        elif fault == "blank-think-cut":
            content = f"\n\n<think>\n{THOUGHTS} Then the"
        elif fault == "think-done-cut":
            content = f"<think>\n{THOUGHTS}\n</think>\n\n"
        elif fault == "quoted-cut":
            content = f'"{content}'
        if fault in ("cut", "quoted-cut", "filtered"):
            content += " Then the cat turns its head toward the"
        message = {"role": "assistant", "content": content}
        if fault == "refusal":
            message = {"role": "assistant", "content": None, "refusal": REFUSAL}
        elif fault == "blank-refusal":
            message = {"role": "assistant", "content": content, "refusal": ""}
        elif fault == "echo-finish":
            message = {"role": "assistant", "content": None}
        elif fault in ("echo-refusal", "echo-apology"):
            quote = "x" * 289 + f" {authorization}"  # the key from the 298th character
            message = {"role": "assistant", "content": None, "refusal": quote}
            if fault == "echo-apology":
                message = {"role": "assistant", "content": REFUSAL + quote[len(REFUSAL) :]}
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": (
                        f"error: bad key in {authorization}"
                        if fault == "echo-finish"
                        else FINISH_REASONS.get(fault, "stop")
                    ),
                }
            ],
        }

    def bodies(self) -> list[dict]:
        """The JSON bodies of the chat requests received so far."""
        with self._lock:
            return [json.loads(r["body"]) for r in self.requests]

    def close(self) -> None:
        self._stopped.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> ChatServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
