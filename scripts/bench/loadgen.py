"""The benchmark's load generator for the served rows: wrk (C, one event-loop thread), not Python threads.

On the benchmark's 2-core machine a client of 16 Python threads (requests sessions, the GIL) used
0.8-0.9 of a core, which the served rows needed, and capped them near 1,100 req/s; wrk keeps
``concurrency`` keep-alive connections open on one thread and used 0.05-0.10 cores at 2,400-6,000
req/s (2026-12 runs, digits and the echo ceiling). How much, it says itself: the child's own
user + system CPU seconds (its rusage, read when it is reaped) over the wall seconds it ran, in
cores, reported beside each served row.

scripts/bench/loadgen.lua prepares the requests: every request POSTs the next of the row's bodies (all of
them, in turn: the sentences, the diabetes rows, both photographs), with the Content-Type and the
``Authorization: Bearer`` token of TorchServe's token authorization taken from the environment.
Loopback only. A run is a fixed duration: wrk is stopped with SIGINT after ``seconds`` (wrk's own
-d takes whole seconds only) and reports the requests it completed, its measured duration, the
latency percentiles of its histogram, answers outside 2xx per status, and socket errors.

wrk comes from Debian's package (scripts/ensure_loadgen.sh, a prerequisite of `make bench` and
`make test`); where it is missing, the served rows fail with the command that installs it rather
than fall back to a slower client that would measure something else.
"""
import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
LUA_SCRIPT = os.path.join(HERE, "loadgen.lua")
INSTALL_HINT = "bash scripts/ensure_loadgen.sh (as root: apt-get install -y wrk; or `make loadgen`)"
THREADS = 1  # one event loop drives every connection; more threads only add CPU on 2 cores
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


class LoadgenMissing(RuntimeError):
    pass


class LoadgenFailed(RuntimeError):
    pass


def find_wrk() -> str:
    """wrk's path, or LoadgenMissing naming the command that installs it."""
    named = os.environ.get("WRK")
    if named and not (os.path.isfile(named) and os.access(named, os.X_OK)):
        raise LoadgenMissing(f"WRK={named} is not an executable; unset it, or run {INSTALL_HINT}")
    found = named or shutil.which("wrk")
    if not found:
        raise LoadgenMissing(f"wrk (the benchmark's load generator) is not installed: run {INSTALL_HINT}")
    return found


def version(wrk: Optional[str] = None) -> str:
    """'wrk debian/4.1.0-3+b2 [epoll]', say; "" where there is none."""
    try:
        out = subprocess.run([wrk or find_wrk(), "--version"], capture_output=True, text=True, timeout=10)
    except (LoadgenMissing, OSError, subprocess.SubprocessError):
        return ""
    return ((out.stdout or out.stderr).splitlines() or [""])[0].split(" Copyright")[0].strip()


def client_cores(user_s: float, system_s: float, wall_s: float) -> float:
    """The client's CPU in cores: its user + system CPU seconds over the wall seconds it ran."""
    return (user_s + system_s) / wall_s if wall_s > 0 else 0.0


@dataclass
class ChildRun:
    """A finished child process: exit code, output, and what it cost."""
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    user_s: float
    system_s: float

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.system_s

    @property
    def cores(self) -> float:
        return client_cores(self.user_s, self.system_s, self.wall_s)


def run_child(argv: Sequence[str], env: Optional[dict] = None, stop_after_s: Optional[float] = None,
              timeout_s: float = 600.0) -> ChildRun:
    """Runs ``argv`` to its end (or SIGINT after ``stop_after_s``, then its end) and reads its own
    CPU use from the rusage that os.wait4 returns when it is reaped: exact, all of its threads, up
    to its last instruction, where sampling its /proc entry would miss the end of the run."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(list(argv), stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        try:
            deadline = started + timeout_s
            if stop_after_s is not None:
                _sleep_unless_exited(process, started + stop_after_s)
                if process.poll() is None:
                    process.send_signal(signal.SIGINT)
            while True:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() > deadline:
                    process.kill()
                    pid, status, usage = os.wait4(process.pid, 0)
                    break
                time.sleep(0.01)
        except BaseException:
            if process.returncode is None:
                process.kill()
                process.wait()
            raise
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        return ChildRun(process.returncode, out.read().decode("utf-8", "replace"),
                        err.read().decode("utf-8", "replace"), wall, usage.ru_utime, usage.ru_stime)


def _sleep_unless_exited(process: subprocess.Popen, until: float) -> None:
    while True:
        left = until - time.perf_counter()
        if left <= 0 or process.poll() is not None:
            return
        time.sleep(min(left, 0.05))


# -- wrk's output --------------------------------------------------------------------------------
@dataclass
class LoadResult:
    """One measured run, as wrk saw it."""
    requests: int = 0                  # answers completed, whatever their status
    seconds: float = 0.0               # wrk's own measured duration
    non2xx: Counter = field(default_factory=Counter)      # "HTTP 503" -> count
    socket_errors: Counter = field(default_factory=Counter)  # "socket timeout" -> count
    latency_ms: Dict[str, float] = field(default_factory=dict)  # p50, p90, p99, mean, max
    first_error: Optional[str] = None
    client_cpu_s: Optional[float] = None
    client_wall_s: Optional[float] = None

    @property
    def ok(self) -> int:
        """2xx answers: the items served (one per request)."""
        return self.requests - sum(self.non2xx.values())

    @property
    def errors(self) -> Counter:
        return self.non2xx + self.socket_errors

    @property
    def client_cores(self) -> Optional[float]:
        if self.client_cpu_s is None or self.client_wall_s is None:
            return None
        return client_cores(self.client_cpu_s, 0.0, self.client_wall_s)


def parse_output(text: str) -> LoadResult:
    """The "loadgen-result" block scripts/bench/loadgen.lua's done() prints (wrk's own summary before it
    is ignored). Latencies arrive in microseconds and leave in milliseconds."""
    lines = text.splitlines()
    try:
        start = lines.index("loadgen-result")
        end = lines.index("loadgen-end", start)
    except ValueError:
        raise LoadgenFailed(f"no loadgen-result block in wrk's output: {text.strip()[-300:]!r}") from None
    values = {}
    for line in lines[start + 1:end]:
        name, _, value = line.partition(" ")
        values[name] = value.strip()
    result = LoadResult(requests=int(values["requests"]), seconds=int(values["duration_us"]) / 1e6)
    for name, value in values.items():
        if name.startswith("status_") and int(value):
            result.non2xx[f"HTTP {name[len('status_'):]}"] = int(value)
        elif name.startswith("socket_") and int(value):
            result.socket_errors[f"socket {name[len('socket_'):]}"] = int(value)
        elif name.startswith("latency_") and name.endswith("_us"):
            result.latency_ms[name[len("latency_"):-len("_us")]] = float(value) / 1000.0
    counted = sum(result.non2xx.values())
    if counted != int(values["non2xx"]):  # a status the block lost: keep the total honest
        result.non2xx["HTTP other"] += int(values["non2xx"]) - counted
    result.first_error = values.get("first_error") or None
    if result.first_error is None and result.socket_errors:
        result.first_error = ", ".join(f"{k}: {v}" for k, v in result.socket_errors.items())
    return result


# -- a run ---------------------------------------------------------------------------------------
def check_loopback(url: str) -> None:
    host = url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
    if host not in LOOPBACK:
        raise ValueError(f"the load generator drives loopback addresses only, not {url}")


def write_bodies(bodies: Sequence[bytes], folder: str) -> str:
    """One file per body and the list of them that loadgen.lua reads; returns the list's path."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for n, body in enumerate(bodies):
        path = os.path.join(folder, f"body_{n:04d}")
        with open(path, "wb") as f:
            f.write(body)
        paths.append(path)
    listing = os.path.join(folder, "bodies.txt")
    with open(listing, "w", encoding="utf-8") as f:
        f.write("\n".join(paths) + "\n")
    return listing


def wrk_argv(wrk: str, url: str, listing: str, concurrency: int, seconds: float,
             timeout_s: float) -> list:
    # -d is a backstop (whole seconds): run() stops wrk with SIGINT after ``seconds``.
    return [wrk, "-t", str(min(THREADS, concurrency)), "-c", str(concurrency),
            "-d", f"{math.ceil(seconds) + 10}s", "--timeout", f"{math.ceil(timeout_s)}s",
            "-s", LUA_SCRIPT, url, "--", listing]


def run(url: str, bodies: Sequence[bytes], content_type: str, token: Optional[str], concurrency: int,
        seconds: float, timeout_s: float, workdir: str) -> LoadResult:
    """POST ``bodies`` in turn over ``concurrency`` connections for ``seconds``: wrk's figures and
    its own CPU use. (A warm-up is a run of its own whose result the caller drops.)"""
    check_loopback(url)
    wrk = find_wrk()
    folder = tempfile.mkdtemp(prefix="loadgen-", dir=workdir)
    try:
        listing = write_bodies(bodies, folder)
        env = {**os.environ, "LOADGEN_CONTENT_TYPE": content_type,
               "LOADGEN_AUTHORIZATION": f"Bearer {token}" if token else ""}
        child = _checked(run_child(wrk_argv(wrk, url, listing, concurrency, seconds, timeout_s), env,
                                   stop_after_s=seconds, timeout_s=seconds + timeout_s + 30))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result = parse_output(child.stdout)
    result.client_cpu_s, result.client_wall_s = child.cpu_s, child.wall_s
    return result


def _checked(child: ChildRun) -> ChildRun:
    if child.returncode != 0 or "loadgen-result" not in child.stdout:
        said = (child.stderr.strip() or child.stdout.strip())[-400:]
        raise LoadgenFailed(f"wrk exited with {child.returncode}: {said}")
    return child
