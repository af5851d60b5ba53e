"""A loopback HTTP server for download tests: serves bytes by path, with scripted misbehaviour."""
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

OK, TRUNCATE, DIE_ONCE, SLOW = "ok", "truncate", "die_once", "slow"


class FileServer:
    """Serves ``routes[path] = (behaviour, body)``; any other path is a 404. ``requests`` records
    (method, path, Range header) for each request. Behaviours: OK (honours ``Range: bytes=N-``),
    TRUNCATE (announces the full length, sends half, closes), DIE_ONCE (TRUNCATE the first time, OK after),
    SLOW (waits ``slow_seconds`` before answering)."""

    def __init__(self, slow_seconds: float = 2.0):
        self.routes, self.requests, self.slow_seconds = {}, [], slow_seconds
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
        range_header = request.headers.get("Range")
        self.requests.append((request.command, request.path, range_header))
        if request.path not in self.routes:
            request.send_error(404)
            return
        behaviour, body = self.routes[request.path]
        if behaviour == SLOW:
            time.sleep(self.slow_seconds)
        start = int(range_header[len("bytes="):-1]) if range_header else 0
        cut = behaviour == TRUNCATE or (behaviour == DIE_ONCE and self.count(request.path) == 1)
        request.send_response(206 if start else 200)
        request.send_header("Content-Length", str(len(body) - start))
        if start:
            request.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        request.end_headers()
        if send_body:
            end = start + (len(body) - start) // 2 if cut else len(body)
            request.wfile.write(body[start:end])

    def count(self, path: str) -> int:
        return sum(1 for _, p, _ in self.requests if p == path)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
