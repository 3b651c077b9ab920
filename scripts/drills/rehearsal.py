"""The rehearsal's parts (scripts/drills/rehearse.py runs them): two TorchServe replicas started by
scripts/entrypoint.sh, the HAProxy gateway in front of them, steady bounded traffic, and
``Rehearsal``, which holds them together for the drills (scripts/drills/rehearsal_drills.py)."""
import contextlib
import csv
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
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import psutil
import requests

from scripts.deploy import gateway
from scripts.serving import manage
from models.catalog import ROOT, Catalog, load_catalog
from scripts.serving.pod_config import served_models
from scripts.serving.ts_client import TorchServeClient
from scripts.serving.ts_server import check_java, free_port

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
        """What a pod's readiness probe asks (scripts/deploy/k8s.py READINESS_CHECK): every served version
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
    """HAProxy with scripts/deploy/gateway.py's configuration, its runtime API on a Unix socket."""

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


