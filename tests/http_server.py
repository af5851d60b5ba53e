"""A loopback HTTP server for download tests: serves bytes by path, with scripted misbehaviour."""
import hashlib
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

OK = "ok"  # honours "Range: bytes=N-" (416 past the end) and If-Range
TRUNCATE = "truncate"  # announces the full length, sends half, closes
DIE_ONCE = "die_once"  # TRUNCATE the first time, OK after
SLOW = "slow"  # waits slow_seconds, then OK
NO_LENGTH = "no_length"  # sends the whole body without Content-Length
IGNORE_RANGE = "ignore_range"  # always 200 with the whole body
WRONG_RANGE = "wrong_range"  # answers a Range request with 206 from byte 0
UNAVAILABLE_ONCE = "unavailable_once"  # 503 the first time, OK after
FORBIDDEN = "forbidden"  # 403


class FileServer:
    """Serves ``routes[path] = (behaviour, body)``; any other path is a 404. ``requests`` records
    (method, path, Range header, If-Range header) for each request. Every response names the body's
    version as ``validators`` says: "etag" (strong), "weak_etag", "last_modified" or "none"."""

    def __init__(self, slow_seconds: float = 2.0):
        self.routes, self.requests, self.slow_seconds, self.validators = {}, [], slow_seconds, "etag"
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                server.handle(self, send_body=False)

            def do_GET(self):
                server.handle(self, send_body=True)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def handle(self, request: BaseHTTPRequestHandler, send_body: bool) -> None:
        range_header, if_range = request.headers.get("Range"), request.headers.get("If-Range")
        self.requests.append((request.command, request.path, range_header, if_range))
        if request.path not in self.routes:
            request.send_error(404)
            return
        behaviour, body = self.routes[request.path]
        first = self.count(request.path) == 1
        if behaviour == FORBIDDEN or (behaviour == UNAVAILABLE_ONCE and first):
            request.send_error(403 if behaviour == FORBIDDEN else 503)
            return
        if behaviour == SLOW:
            time.sleep(self.slow_seconds)
        if if_range is not None and if_range != validator(self.validators, body):
            range_header = None  # RFC 9110: another version of the file than the client has, so send it whole
        start = int(range_header[len("bytes="):-1]) if range_header and behaviour != IGNORE_RANGE else 0
        if start >= len(body) and start:
            request.send_response(416)
            request.send_header("Content-Range", f"bytes */{len(body)}")  # the size, as RFC 9110 asks
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        if behaviour == WRONG_RANGE and start:
            start, claimed = 0, f"bytes 0-{len(body) - 1}/{len(body)}"
        else:
            claimed = f"bytes {start}-{len(body) - 1}/{len(body)}"
        request.send_response(206 if range_header and behaviour != IGNORE_RANGE else 200)
        if self.validators != "none":
            header = "Last-Modified" if self.validators == "last_modified" else "ETag"
            request.send_header(header, validator(self.validators, body))
        if behaviour != NO_LENGTH:
            request.send_header("Content-Length", str(len(body) - start))
        if range_header and behaviour != IGNORE_RANGE:
            request.send_header("Content-Range", claimed)
        request.end_headers()
        if send_body:
            cut = behaviour == TRUNCATE or (behaviour == DIE_ONCE and first)
            end = start + (len(body) - start) // 2 if cut else len(body)
            request.wfile.write(body[start:end])

    def count(self, path: str) -> int:
        return sum(1 for request in self.requests if request[1] == path)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def validator(kind: str, body: bytes) -> str:
    """What a server sends to identify this version of ``body``: an ETag of ``kind`` "etag" or
    "weak_etag", or a date for "last_modified"."""
    digest = hashlib.sha1(body).hexdigest()
    if kind == "last_modified":
        return formatdate(1_500_000_000 + int(digest[:6], 16), usegmt=True)
    return ("W/" if kind == "weak_etag" else "") + f'"{digest[:16]}"'
