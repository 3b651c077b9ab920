"""Local rehearsal of the cluster, with its real parts, on loopback only: two TorchServe replicas
started by scripts/entrypoint.sh (each on its own free ports, with its own TMPDIR and logs, serving
the light models only: digits 1.0 and 2.0, diabetes), the gateway (HAProxy with scripts/gateway.py's
configuration) in front of them, and drills under steady, bounded traffic:

  kill      kill -9 one replica (its process group: Java frontend and Python workers): only requests
            in flight may fail; how long until the gateway marks it DOWN
  restart   run its entrypoint again: kept out of the gateway until it is ready (as a readiness probe
            keeps a pod out of its Service), then let in; how long until it serves again
  rollout   digits 2.0 as the default, replica by replica (drain in the gateway, set-default, ready):
            no request fails, and every answer comes from the version its replica served then
  auth      a missing or wrong key: 401 from the gateway, and no replica sees the request
  limits    a form-urlencoded upload: 415; a body over max_request_size: 413

    python -m scripts.rehearse [--threads 3] [--json report.json]      (make rehearse)

Exit status 1 when a drill fails. Each drill is a function of a running ``Rehearsal`` (the tests
call them one by one).
"""
import argparse
import contextlib
import csv
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import psutil
import requests

from scripts import gateway, manage
from scripts.catalog import ROOT, Catalog, load_catalog
from scripts.pod_config import served_models
from scripts.ts_client import TorchServeClient
from scripts.ts_server import check_java, free_port

LIGHT_MODELS = "digits.mar,digits_v2.0.mar,diabetes.mar"
ENTRYPOINT = os.path.join(ROOT, "scripts", "entrypoint.sh")
BACKEND = "torchserve"
VERSION_HEADER = "X-Model-Version"
HAPROXY_HINT = ("haproxy was not found. The rehearsal runs Debian 12's HAProxy 2.6 in front of the "
                "replicas: install it with `apt-get install -y haproxy` (as root: bash "
                "scripts/ensure_haproxy.sh), or put an haproxy 2.6+ binary on PATH or in $HAPROXY.")


class RehearsalError(RuntimeError):
    pass


def haproxy_binary() -> str:
    """The haproxy to run: $HAPROXY, else the one on PATH, else Debian's /usr/sbin/haproxy."""
    for candidate in (os.environ.get("HAPROXY"), shutil.which("haproxy"), "/usr/sbin/haproxy"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise RehearsalError(HAPROXY_HINT)


# -- a replica -----------------------------------------------------------------------------------

class Replica:
    """One TorchServe replica run by scripts/entrypoint.sh in its own process group."""

    def __init__(self, name: str, home: str, catalog: Catalog, models: str = LIGHT_MODELS):
        self.name, self.home, self.catalog, self.models = name, os.path.abspath(home), catalog, models
        self.ports = {key: free_port() for key in ("inference", "management", "metrics", "grpc", "grpc_management")}
        self.inference_url = f"http://127.0.0.1:{self.ports['inference']}"
        self.management_url = f"http://127.0.0.1:{self.ports['management']}"
        self.client = TorchServeClient(self.inference_url, self.management_url, home=self.home, timeout=10)
        self.process: Optional[subprocess.Popen] = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports['inference']}"

    @property
    def log_dir(self) -> str:
        return os.path.join(self.home, "logs")

    def env(self) -> dict:
        tmp = os.path.join(self.home, "tmp")
        env = dict(os.environ)
        for key in [k for k in env if k.startswith("TS_")]:   # nothing from the caller's TorchServe
            del env[key]
        env.update(
            TMPDIR=tmp, TEMP=tmp, LOG_LOCATION=self.log_dir, METRICS_LOCATION=self.log_dir,
            PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
            PYTHON=sys.executable,
            TS_INFERENCE_ADDRESS=self.inference_url, TS_MANAGEMENT_ADDRESS=self.management_url,
            TS_METRICS_ADDRESS=f"http://127.0.0.1:{self.ports['metrics']}",
            TS_GRPC_INFERENCE_ADDRESS="127.0.0.1", TS_GRPC_INFERENCE_PORT=str(self.ports["grpc"]),
            TS_GRPC_MANAGEMENT_ADDRESS="127.0.0.1", TS_GRPC_MANAGEMENT_PORT=str(self.ports["grpc_management"]),
            TS_LOAD_MODELS=self.models, TS_ENABLE_MODEL_API="false")   # as in the pods (deploy/k8s)
        return env

    def start(self) -> None:
        if self.process and self.process.poll() is None:
            raise RehearsalError(f"{self.name} is already running")
        os.makedirs(os.path.join(self.home, "tmp"), exist_ok=True)
        os.makedirs(self.log_dir, exist_ok=True)
        self.starts += 1
        console = open(os.path.join(self.log_dir, f"entrypoint-{self.starts}.log"), "wb")
        with console:
            self.process = subprocess.Popen([ENTRYPOINT], cwd=ROOT, env=self.env(), stdout=console,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)

    def expected(self) -> Dict[Tuple[str, str], int]:
        """(model, version) -> minWorkers, for every version the replica serves."""
        return {(m.name, m.version): m.serving["minWorkers"] for m in served_models(self.catalog, self.models)}

    def ready(self) -> Tuple[bool, str]:
        """What a pod's readiness probe asks (scripts/k8s.py READINESS_CHECK): every served version
        has its minWorkers READY; and the catalog's default versions are in place."""
        if self.process is None or self.process.poll() is not None:
            return False, "entrypoint not running"
        try:
            for (name, version), least in self.expected().items():
                ready = self.client.ready_workers(name, version)
                if ready < least:
                    return False, f"{name} {version}: {ready} of {least} workers READY"
            for name, version in self.catalog.default_versions().items():
                if any(n == name for n, _ in self.expected()):
                    current = manage.default_version(self.client, name)
                    if len({v for n, v in self.expected() if n == name}) > 1 and current != version:
                        return False, f"{name}: default version {current}, the catalog says {version}"
        except Exception as exc:  # noqa: BLE001 - not ready, say why
            return False, f"{type(exc).__name__}: {exc}"
        return True, "ready"

    def wait_ready(self, timeout_s: float = 240.0) -> Dict[str, float]:
        """Until ready(); returns seconds since now until /ping first answered and until ready."""
        started = time.monotonic()
        times: Dict[str, float] = {}
        why = "not started"
        while time.monotonic() - started < timeout_s:
            if "ping" not in times:
                with contextlib.suppress(requests.RequestException):
                    if requests.get(self.inference_url + "/ping", timeout=1).status_code == 200:
                        times["ping"] = time.monotonic() - started
            ok, why = self.ready()
            if ok:
                times["ready"] = time.monotonic() - started
                times.setdefault("ping", times["ready"])
                return times
            if self.process is None or self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise RehearsalError(f"replica {self.name} not ready after {time.monotonic() - started:.0f} s: "
                             f"{why}\n{self.log_tail()}")

    def group(self) -> List[psutil.Process]:
        """Every process of the replica's process group (entrypoint, wrapper, Java, workers)."""
        if self.process is None:
            return []
        out = []
        for proc in psutil.process_iter(["pid"]):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(proc.pid) == self.process.pid:
                    out.append(proc)
        return out

    def kill9(self) -> List[psutil.Process]:
        """SIGKILL to the whole process group at once; returns its processes (reap()s them)."""
        members = self.group()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return members

    def reap(self, members: Sequence[psutil.Process]) -> List[psutil.Process]:
        """Wait for killed processes to be gone; returns those still alive."""
        _, alive = psutil.wait_procs(members, timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        return alive

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM to the entrypoint (which stops TorchServe); SIGKILL to what is left."""
        if self.process is None:
            return
        members = self.group()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout_s)
        _, alive = psutil.wait_procs(members, timeout=5)
        if alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            psutil.wait_procs(alive, timeout=10)

    def access_log(self) -> str:
        path = os.path.join(self.log_dir, "access_log.log")
        try:
            with open(path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for name in (f"entrypoint-{self.starts}.log", "ts_log.log"):
            path = os.path.join(self.log_dir, name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out.append(f"--- {self.name} {name}\n" + "".join(f.readlines()[-lines:]))
        return "\n".join(out)


# -- the gateway ---------------------------------------------------------------------------------

class Gateway:
    """HAProxy with scripts/gateway.py's configuration, its runtime API on a Unix socket."""

    def __init__(self, home: str, catalog: Catalog, servers: Sequence[Tuple[str, str]], key: str):
        self.home = os.path.abspath(home)
        os.makedirs(self.home, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.keys_file = os.path.join(self.home, gateway.DIGESTS_FILE)
        self.socket = os.path.join(self.home, "admin.sock")
        self.config = os.path.join(self.home, "haproxy.cfg")
        with open(self.keys_file, "w", encoding="utf-8") as f:
            f.write(gateway.key_digest(key) + "\n")
        os.chmod(self.keys_file, 0o600)
        with open(self.config, "w", encoding="utf-8") as f:
            f.write(gateway.render_haproxy_config(catalog, servers, f"127.0.0.1:{self.port}", self.keys_file,
                                                  admin_socket=self.socket, expose_server=True))
        self.binary = haproxy_binary()
        self.process: Optional[subprocess.Popen] = None

    def start(self, timeout_s: float = 20.0) -> None:
        check = subprocess.run([self.binary, "-c", "-q", "-f", self.config], capture_output=True, text=True)
        if check.returncode != 0:
            raise RehearsalError(f"haproxy -c refused {self.config}:\n{check.stdout}{check.stderr}")
        log = open(os.path.join(self.home, "haproxy.log"), "wb")
        with log:
            self.process = subprocess.Popen([self.binary, "-db", "-f", self.config], stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise RehearsalError(f"haproxy did not start; see {self.home}/haproxy.log")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(timeout=10)

    def runtime(self, command: str) -> str:
        """One command of HAProxy's runtime API (the stats socket, level admin)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(self.socket)
            s.sendall(command.encode() + b"\n")
            chunks = []
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def servers(self) -> Dict[str, dict]:
        """Server name -> its `show stat` row (status: UP, DOWN, DRAIN, MAINT, 'UP 1/2'...; scur...)."""
        text = self.runtime("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {row["svname"]: row for row in rows
                if row.get("pxname") == BACKEND and row["svname"] not in ("FRONTEND", "BACKEND")}

    def status(self, server: str) -> str:
        return self.servers()[server]["status"]

    def set_state(self, server: str, state: str) -> None:
        answer = self.runtime(f"set server {BACKEND}/{server} state {state}").strip()
        if answer:
            raise RehearsalError(f"set server {server} state {state}: {answer}")

    def wait_status(self, server: str, prefix: str, timeout_s: float = 30.0, poll_s: float = 0.02,
                    seen: Optional[Dict[str, float]] = None) -> float:
        """Seconds until the server's status is ``prefix`` ('DOWN', 'UP', ...; not 'UP 1/2', a
        transition). ``seen``: filled with the seconds at which each status was first seen."""
        started = time.monotonic()
        while True:
            status = self.status(server)
            if seen is not None:
                seen.setdefault(status, round(time.monotonic() - started, 3))
            if status.startswith(prefix) and not status.startswith(prefix + " "):
                return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                raise RehearsalError(f"gateway: {server} is {status!r}, not {prefix} after {timeout_s:.0f} s")
            time.sleep(poll_s)


# -- traffic ------------------------------------------------------------------------------------

@dataclass
class Record:
    sent: float
    done: float
    model: str
    status: int            # 0: no HTTP answer
    version: Optional[str]
    server: Optional[str]
    error: str = ""


class Load:
    """``threads`` clients posting to /predictions/digits (3 of 4) and /predictions/diabetes through
    the gateway with the key, ``think_s`` between requests, until stopped or ``max_requests``."""

    def __init__(self, url: str, key: str, digits: Sequence[bytes], rows: Sequence[list],
                 threads: int = 3, think_s: float = 0.02, max_requests: int = 20000, timeout_s: float = 30.0):
        self.url, self.key, self.digits, self.rows = url, key, list(digits), list(rows)
        self.think_s, self.max_requests, self.timeout_s = think_s, max_requests, timeout_s
        self.records: List[Record] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sent = 0
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(threads)]

    def _next(self) -> Optional[int]:
        with self._lock:
            if self._sent >= self.max_requests:
                return None
            self._sent += 1
            return self._sent

    def _run(self, k: int) -> None:
        session = requests.Session()
        # One connection per request: a failure is then always the gateway's. With keep-alive, a
        # request sent on a reused client connection at the moment the gateway closed it (after it
        # retried the previous request on the other replica) was refused by the client's socket
        # before the gateway parsed it (RemoteDisconnected, not in the gateway's log): a
        # client-side retry matter (RFC 9110 9.2.2), not what the drills measure.
        headers = {"X-API-Key": self.key, "Connection": "close"}
        while not self._stop.is_set():
            n = self._next()
            if n is None:
                return
            if n % 4 == 0:
                model, body, kind = "diabetes", json.dumps(self.rows[n % len(self.rows)]).encode(), "application/json"
            else:
                model, body, kind = "digits", self.digits[n % len(self.digits)], "image/png"
            sent = time.monotonic()
            try:
                r = session.post(f"{self.url}/predictions/{model}", data=body,
                                 headers={**headers, "Content-Type": kind}, timeout=self.timeout_s)
                record = Record(sent, time.monotonic(), model, r.status_code, r.headers.get(VERSION_HEADER),
                                r.headers.get(gateway.SERVER_HEADER), "" if r.ok else r.text[:200])
            except requests.RequestException as exc:
                record = Record(sent, time.monotonic(), model, 0, None, None, f"{type(exc).__name__}: {exc}"[:200])
            with self._lock:
                self.records.append(record)
            if self.think_s:
                time.sleep(self.think_s)

    def snapshot(self) -> List[Record]:
        with self._lock:
            return list(self.records)

    def wait_answers(self, count: int, timeout_s: float = 60.0, server: Optional[str] = None) -> None:
        """Until ``count`` more answers (from ``server``, if named) than now."""
        def answered():
            return sum(1 for r in self.snapshot() if r.status and (server is None or r.server == server))
        target = answered() + count
        deadline = time.monotonic() + timeout_s
        while answered() < target:
            if time.monotonic() > deadline:
                raise RehearsalError(f"traffic: fewer than {count} answers{f' from {server}' if server else ''} "
                                     f"in {timeout_s:.0f} s")
            time.sleep(0.02)

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout_s + 5)


def failed(records: Sequence[Record]) -> List[Record]:
    return [r for r in records if r.status != 200]


# -- the rehearsal ------------------------------------------------------------------------------

@dataclass
class DrillResult:
    name: str
    ok: bool
    requests: int = 0
    failed: int = 0
    figures: Dict[str, object] = field(default_factory=dict)
    problems: List[str] = field(default_factory=list)

    def line(self) -> str:
        figures = ", ".join(f"{k} {v:.2f} s" if isinstance(v, float) else f"{k} {v}" for k, v in self.figures.items())
        return (f"{'ok  ' if self.ok else 'FAIL'} {self.name:<8} requests {self.requests:>5}  failed {self.failed:>3}"
                f"  {figures}" + "".join(f"\n       - {p}" for p in self.problems))


class Rehearsal:
    """Two replicas and the gateway, started and stopped together (a context manager)."""

    def __init__(self, home: str, catalog: Optional[Catalog] = None, replicas: int = 2,
                 models: str = LIGHT_MODELS, threads: int = 3):
        self.home = os.path.abspath(home)
        self.catalog = catalog or load_catalog()
        self.threads = threads
        self.key = gateway.new_key()
        haproxy_binary()   # fail early, with the hint
        self.replicas = {f"s{i}": Replica(f"s{i}", os.path.join(self.home, f"s{i}"), self.catalog, models)
                         for i in range(1, replicas + 1)}
        self.gateway = Gateway(os.path.join(self.home, "gateway"), self.catalog,
                               [(name, r.address) for name, r in self.replicas.items()], self.key)
        from models import sample_data
        _, _, images, _ = sample_data.digits_split()
        self.digits = [sample_data.png_bytes(p) for p in images[:64]]
        from sklearn.datasets import load_diabetes
        self.rows = load_diabetes(scaled=False).data[:32].tolist()
        self.startup: Dict[str, Dict[str, float]] = {}

    def load(self, **kwargs) -> Load:
        return Load(self.gateway.url, self.key, self.digits, self.rows, **{"threads": self.threads, **kwargs})

    def start(self, timeout_s: float = 300.0) -> None:
        check_java()
        started = time.monotonic()
        for replica in self.replicas.values():
            replica.start()
        for name, replica in self.replicas.items():
            remaining = max(30.0, timeout_s - (time.monotonic() - started))
            self.startup[name] = replica.wait_ready(remaining)
        self.gateway.start()
        for name in self.replicas:
            self.gateway.wait_status(name, "UP", timeout_s=30)
        self.startup["all"] = {"ready": time.monotonic() - started}

    def stop(self) -> None:
        self.gateway.stop()
        for replica in self.replicas.values():
            replica.stop()

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()


# -- the drills ---------------------------------------------------------------------------------

def _wait_dead(members: Sequence[psutil.Process], timeout_s: float = 10.0) -> float:
    """Seconds until every process is gone (or a zombie), polled every 5 ms."""
    started = time.monotonic()
    def alive(p):
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False
    while any(alive(p) for p in members) and time.monotonic() - started < timeout_s:
        time.sleep(0.005)
    return time.monotonic() - started


def drill_kill(reh: Rehearsal, victim: str = "s1", before_s: float = 2.0, after_s: float = 3.0) -> DrillResult:
    """kill -9 of one replica's process group under steady traffic. Only requests in flight while
    it died (sent before its last process was gone) may fail; the gateway must mark it DOWN
    (detection time: from the SIGKILL) and send everything else to the other replica."""
    replica = reh.replicas[victim]
    with reh.load() as load:
        load.wait_answers(20, server=victim)
        time.sleep(before_s)
        killed_at = time.monotonic()
        members = replica.kill9()
        dead: Dict[str, float] = {}
        watcher = threading.Thread(target=lambda: dead.setdefault("s", _wait_dead(members)), daemon=True)
        watcher.start()
        transitions: Dict[str, float] = {}
        polled = time.monotonic()
        reh.gateway.wait_status(victim, "DOWN", timeout_s=30, poll_s=0.01, seen=transitions)
        detection_s = time.monotonic() - killed_at
        transitions = {k: round(v + polled - killed_at, 3) for k, v in transitions.items()}
        watcher.join(timeout=15)
        survivors = replica.reap(members)
        time.sleep(after_s)
    dead_at = killed_at + dead.get("s", 0.0)
    records = load.snapshot()
    bad = failed(records)
    problems = [f"sent {r.sent - dead_at:+.3f} s after the replica was gone, failed: {r.status} {r.error}"
                for r in bad if r.sent > dead_at]
    in_flight = sum(1 for r in records if r.sent <= dead_at and r.done >= killed_at)
    late = [r for r in records if r.server == victim and r.sent > dead_at]
    problems += [f"{len(late)} requests sent after the kill were answered by {victim}"] if late else []
    if len(members) < 3:
        problems.append(f"the killed process group held only {len(members)} processes")
    if survivors:
        problems.append(f"still alive after SIGKILL: {[p.pid for p in survivors]}")
    return DrillResult("kill", not problems, len(records), len(bad), {
        "processes_killed": len(members), "gone_after": dead.get("s", float("nan")),
        "in_flight": in_flight, "failed_in_flight": sum(1 for r in bad if r.sent <= dead_at),
        "gateway_states": transitions, "detection": detection_s}, problems)


def drill_restart(reh: Rehearsal, victim: str = "s1", timeout_s: float = 240.0) -> DrillResult:
    """Run the replica's entrypoint again under traffic. The gateway keeps it in maintenance until
    it is ready (every served version's workers READY, default versions set: what a readiness
    probe checks), then lets it in; rejoin = from the start until it answers through the gateway."""
    replica = reh.replicas[victim]
    if replica.process is not None and replica.process.poll() is None:   # not killed before: kill it
        replica.reap(replica.kill9())
        reh.gateway.wait_status(victim, "DOWN", timeout_s=30)
    with reh.load() as load:
        reh.gateway.set_state(victim, "maint")       # out of rotation until ready, like an unready pod
        started = time.monotonic()
        replica.start()
        times = replica.wait_ready(timeout_s)
        reh.gateway.set_state(victim, "ready")
        up_s = reh.gateway.wait_status(victim, "UP", timeout_s=30) + (times["ready"])
        load.wait_answers(10, server=victim, timeout_s=60)
        rejoin_s = min(r.done for r in load.snapshot() if r.server == victim and r.sent >= started) - started
        time.sleep(1.0)
    records = [r for r in load.snapshot()]
    bad = failed(records)
    problems = [f"failed: {r.status} {r.error}" for r in bad][:10]
    return DrillResult("restart", not bad, len(records), len(bad), {
        "ping_answers": times["ping"], "ready": times["ready"], "gateway_up": up_s,
        "rejoin": rejoin_s}, problems)


def drill_rollout(reh: Rehearsal, model: str = "digits", version: str = "2.0",
                  settle_s: float = 1.0) -> DrillResult:
    """``version`` of ``model`` as the default, one replica at a time, under traffic: drain it in the
    gateway (no new requests), wait for its requests in flight, set-default, put it back. No request
    may fail; an answer a replica finished before its switch carries the old version, one sent to it
    after the switch the new version, and none may be in flight on it during the switch."""
    switch: Dict[str, Tuple[float, float]] = {}   # replica -> set-default (started, returned)
    before: Dict[str, str] = {}
    drains: Dict[str, float] = {}
    with reh.load() as load:
        load.wait_answers(20)
        for name, replica in reh.replicas.items():
            before[name] = manage.default_version(replica.client, model)
            reh.gateway.set_state(name, "drain")
            drain_started = time.monotonic()
            deadline = drain_started + 30
            while int(reh.gateway.servers()[name]["scur"] or 0) > 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            drains[name] = time.monotonic() - drain_started
            history = os.path.join(replica.home, manage.HISTORY_FILE)
            started = time.monotonic()
            manage.set_default(replica.client, model, version, history)
            switch[name] = (started, time.monotonic())
            reh.gateway.set_state(name, "ready")
            load.wait_answers(20, server=name)
            time.sleep(settle_s)
    records = load.snapshot()
    bad = failed(records)
    problems = [f"failed: {r.status} {r.error}" for r in bad][:10]
    wrong = []
    for r in records:
        if r.model != model or r.status != 200 or r.server not in switch:
            continue
        started, returned = switch[r.server]
        if r.done <= started:
            expected = before[r.server]
        elif r.sent >= returned:
            expected = version
        else:
            wrong.append(f"{r.server} had a request in flight during its switch "
                         f"(sent {r.sent - started:+.3f} s, answered {r.done - started:+.3f} s)")
            continue
        if r.version != expected:
            wrong.append(f"{r.server} answered with {r.version}, expected {expected}")
    problems += wrong[:10]
    served: Dict[str, int] = {}
    for r in records:
        if r.model == model and r.status == 200:
            served[f"{r.server}:{r.version}"] = served.get(f"{r.server}:{r.version}", 0) + 1
    return DrillResult("rollout", not bad and not wrong, len(records), len(bad),
                       {"answers": dict(sorted(served.items())), "wrong_version": len(wrong),
                        "longest_drain": max(drains.values())}, problems)


def _seen_by_replicas(reh: Rehearsal, marker: str) -> int:
    return sum(r.access_log().count(marker) for r in reh.replicas.values())


def drill_auth(reh: Rehearsal) -> DrillResult:
    """No key, a wrong key, the key under another scheme: 401 with a JSON body, and no replica sees
    the request (its path is looked for in every replica's access log). The right key gets through
    (the same path reaches a replica's access log: the check can see a request that passes)."""
    marker = f"drill{uuid.uuid4().hex[:12]}"
    path = f"/predictions/{marker}"
    cases = {"no key": {}, "wrong X-API-Key": {"X-API-Key": gateway.new_key()},
             "wrong Bearer": {"Authorization": f"Bearer {gateway.new_key()}"},
             "key as Basic": {"Authorization": f"Basic {reh.key}"},
             "key without scheme": {"Authorization": reh.key}}
    problems, statuses = [], {}
    for case, headers in cases.items():
        r = requests.post(reh.gateway.url + path, data=reh.digits[0],
                          headers={**headers, "Content-Type": "image/png"}, timeout=10)
        statuses[case] = r.status_code
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.status_code != 401 or not isinstance(body, dict) or body.get("code") != 401:
            problems.append(f"{case}: {r.status_code} {r.text[:120]}")
    for case, headers in {"X-API-Key": {"X-API-Key": reh.key},
                          "Bearer": {"Authorization": f"Bearer {reh.key}"}}.items():
        r = requests.post(reh.gateway.url + "/predictions/digits", data=reh.digits[0],
                          headers={**headers, "Content-Type": "image/png"}, timeout=10)
        statuses[f"right key ({case})"] = r.status_code
        if r.status_code != 200:
            problems.append(f"right key as {case}: {r.status_code} {r.text[:120]}")
    time.sleep(1.0)   # access logs are written when the answer is sent
    seen = _seen_by_replicas(reh, marker)
    if seen:
        problems.append(f"replicas logged {seen} of the refused requests")
    control = requests.post(reh.gateway.url + path, data=reh.digits[0],
                            headers={"X-API-Key": reh.key, "Content-Type": "image/png"}, timeout=10)
    deadline = time.monotonic() + 5
    while _seen_by_replicas(reh, marker) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    if _seen_by_replicas(reh, marker) != 1:
        problems.append(f"control request with the key (answered {control.status_code}) not found in "
                        "the replicas' access logs: the check cannot see requests")
    return DrillResult("auth", not problems, len(cases) + 3, 0,  # + the key twice + the control
                       {"statuses": statuses, "refused_seen_by_replicas": seen}, problems)


def _raw_request(url: str, path: str, headers: Dict[str, str], body: bytes = b"") -> Tuple[int, bytes]:
    """Headers (and ``body``) on a plain connection; the answer is read even if the gateway answers
    before the body it was promised (as it does for a Content-Length over the limit)."""
    host, port = url.split("//", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest("POST", path)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        if body:
            conn.send(body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def drill_limits(reh: Rehearsal) -> DrillResult:
    """A form-urlencoded upload (curl --data-binary @photo without a type): 415 naming the fix,
    where a replica asked directly answers 500. A Content-Length over max_request_size: 413 before
    any of the body is read."""
    problems, figures = [], {}
    png = reh.digits[0]
    form = {"X-API-Key": reh.key, "Content-Type": "application/x-www-form-urlencoded"}
    r = requests.post(reh.gateway.url + "/predictions/digits", data=png, headers=form, timeout=10)
    figures["form_upload"] = r.status_code
    if r.status_code != 415 or "curl -T" not in r.text or r.json().get("code") != 415:
        problems.append(f"form upload: {r.status_code} {r.text[:150]}")
    # What TorchServe itself makes of such an upload (asked directly, bypassing the gateway).
    from models import sample_data
    replica_url = next(iter(reh.replicas.values())).inference_url + "/predictions/digits"
    for name, data in (("png", png), ("jpeg", sample_data.photo_bytes()[0])):
        direct = requests.post(replica_url, data=data, timeout=30,
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
        figures[f"form_{name}_direct_to_torchserve"] = f"{direct.status_code} {direct.text[:80]!r}"
    limit = gateway.max_request_size(reh.catalog)
    status, body = _raw_request(reh.gateway.url, "/predictions/digits",
                                {"X-API-Key": reh.key, "Content-Type": "image/png",
                                 "Content-Length": str(limit + 1)})
    figures["oversized"] = status
    if status != 413 or json.loads(body or b"{}").get("code") != 413:
        problems.append(f"oversized body: {status} {body[:150]!r}")
    status, _ = _raw_request(reh.gateway.url, "/predictions/digits",
                             {"X-API-Key": reh.key, "Content-Type": "image/png",
                              "Content-Length": str(len(png))}, png)
    figures["within_limit"] = status
    if status != 200:
        problems.append(f"a PNG within the limit: {status}")
    return DrillResult("limits", not problems, 5, 0, figures, problems)


DRILLS = {"kill": drill_kill, "restart": drill_restart, "rollout": drill_rollout,
          "auth": drill_auth, "limits": drill_limits}


def run(home: str, threads: int = 3, drills: Sequence[str] = tuple(DRILLS)) -> Tuple[List[DrillResult], dict]:
    results = []
    started = time.monotonic()
    with Rehearsal(home, threads=threads) as reh:
        startup = dict(reh.startup)
        print(f"2 replicas ready and the gateway up in {startup['all']['ready']:.1f} s "
              f"(gateway {reh.gateway.url}, logs in {os.path.relpath(reh.home, ROOT)})", flush=True)
        for name in drills:
            t0 = time.monotonic()
            try:
                result = DRILLS[name](reh)
            except RehearsalError as exc:
                result = DrillResult(name, False, problems=[str(exc)])
            result.figures["took"] = time.monotonic() - t0
            print(result.line(), flush=True)
            results.append(result)
    return results, {"startup": startup, "total_s": time.monotonic() - started}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.rehearse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", default=os.path.join(ROOT, "build", "rehearsal"),
                        help="replicas' and gateway's files and logs (emptied first)")
    parser.add_argument("--threads", type=int, default=3, help="client threads of the steady traffic")
    parser.add_argument("--drill", action="append", choices=list(DRILLS),
                        help="run only these drills (repeat; default: all, in order)")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    try:
        haproxy_binary()
    except RehearsalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shutil.rmtree(args.home, ignore_errors=True)
    try:
        results, meta = run(args.home, args.threads, args.drill or list(DRILLS))
    except RehearsalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    total = sum(r.requests for r in results)
    bad = sum(r.failed for r in results)
    print(f"\n{len(results)} drills, {sum(r.ok for r in results)} passed; {total} requests sent, {bad} failed; "
          f"{meta['total_s']:.0f} s in all")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"drills": [r.__dict__ for r in results], **meta}, f, indent=2, default=str)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
