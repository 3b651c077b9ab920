"""scripts/bench/single_request.py's paired rounds: each round calls the handler, then sends the
same body to the server, and the figure is the median of the per-round differences; a non-200
answer stops it. A stand-in handler and a loopback HTTP server keep it exact and fast."""
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from scripts.bench import single_request


class Slow(BaseHTTPRequestHandler):
    delay_s, status, seen = 0.004, 200, []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Slow.seen.append((self.path, self.headers.get("Authorization"), self.headers["Content-Type"], body))
        time.sleep(Slow.delay_s)
        self.send_response(Slow.status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    Slow.seen, Slow.status = [], 200
    yield f"http://127.0.0.1:{httpd.server_address[1]}/predictions/m"
    httpd.shutdown()


def test_paired_rounds_subtract_the_handler_round_by_round(server):
    calls = []

    def pipeline(values):
        calls.append(values)
        time.sleep(0.002)

    result = single_request.paired_rounds(pipeline, "value", server, b"jpeg", "image/jpeg", "tok", rounds=10)
    assert result["rounds"] == 10 and len(calls) == 13 and calls[0] == ["value"]  # 3 unmeasured rounds
    assert len(Slow.seen) == 13 and Slow.seen[0] == ("/predictions/m", "Bearer tok", "image/jpeg", b"jpeg")
    assert 1.5 <= result["in_process_p50_ms"] < result["served_p50_ms"]
    # served ~4 ms + HTTP, handler ~2 ms: the difference is the served side's extra
    assert result["gap_p50_ms"] == pytest.approx(result["served_p50_ms"] - result["in_process_p50_ms"], abs=1.0)
    assert result["gap_p50_ms"] > 1.0


def test_a_failed_answer_stops_the_rounds(server):
    Slow.status = 503
    with pytest.raises(RuntimeError, match="HTTP 503"):
        single_request.paired_rounds(lambda values: None, "v", server, b"x", "image/jpeg", None, rounds=5)
    assert Slow.seen[0][1] is None  # no token: no Authorization header


def test_the_markdown_shows_paired_rows_and_torchserve_alone():
    result = {"archive": "m.mar", "machine": "here", "ratios": {"served_p50_ms: 12 MP phone photo / china.jpg": 2.0},
              "torchserve_alone": {"p50_ms": 1.25, "p99_ms": 3.5},
              "rows": [{"input": "china.jpg", "in_process_p50_ms": 14.0, "latency_p50_ms": 18.0,
                        "latency_p99_ms": 30.0, "latency_minus_in_process_ms": 4.0,
                        "paired": {"rounds": 60, "in_process_p50_ms": 14.5, "served_p50_ms": 17.5,
                                   "gap_p50_ms": 3.0}}]}
    text = single_request.markdown(result)
    assert "| china.jpg | 14.5 ms | 17.5 ms | +3.0 ms |" in text
    assert "TorchServe alone (echo handler, no model, batch 1, one connection): p50 1.25 ms" in text
