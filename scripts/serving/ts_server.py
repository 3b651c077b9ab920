"""Starting and stopping a real TorchServe (Java frontend + Python workers) from a home folder.

``torchserve --start`` keeps its pid file in the temporary directory and its key file and logs in
the current directory; giving each server its own home (TMPDIR, cwd, LOG_LOCATION) lets the tests
and the benchmark run servers beside the one ``make serve`` started.
"""
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing
from typing import Dict, Optional

import psutil
import requests

from models.catalog import (CONFIG_PROPERTIES_PATH, ROOT, Catalog, parse_config_properties,
                            render_config_properties)
from scripts.serving.ts_client import TorchServeClient

MIN_JAVA = 17


def check_java() -> str:
    """The java version string, or SystemExit with what to do about it."""
    java = shutil.which("java")
    hint = ("TorchServe needs Java 17 or newer. Install it with:\n"
            "  apt-get update && apt-get install -y openjdk-17-jre-headless\n"
            "or set JAVA_HOME/PATH to an existing Java 17 runtime.")
    if not java:
        raise SystemExit(f"java was not found on PATH. {hint}")
    output = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    match = re.search(r'version "(\d+)', output)
    if not match or int(match.group(1)) < MIN_JAVA:
        raise SystemExit(f"found {output.splitlines()[0] if output else java}. {hint}")
    return output.splitlines()[0]


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_addresses() -> dict:
    """Fresh 127.0.0.1 ports for every listener."""
    return {"inference_address": f"http://127.0.0.1:{free_port()}",
            "management_address": f"http://127.0.0.1:{free_port()}",
            "metrics_address": f"http://127.0.0.1:{free_port()}",
            "grpc_inference_port": free_port(), "grpc_management_port": free_port()}


def console_command(script: str, module: str) -> list:
    """A console script of this Python's environment, or ``python -m module`` where the package
    is importable without its scripts (the GPU machine gets TorchServe unpacked on PYTHONPATH)."""
    path = os.path.join(os.path.dirname(sys.executable), script)
    return [path] if os.path.exists(path) else [sys.executable, "-m", module]


def torchserve_command() -> list:
    return console_command("torchserve", "ts.model_server")


def archiver_command() -> list:
    return console_command("torch-model-archiver", "model_archiver.model_packaging")


class TorchServe:
    """One TorchServe instance. ``home`` holds its pid file, temporary files and logs; it runs in
    ``cwd`` (where TorchServe writes key_file.json and resolves a relative model_store).
    ``extra_env`` changes the environment it starts with (a value of None removes the variable)."""

    def __init__(self, home: str, config_path: str, cwd: Optional[str] = None,
                 extra_env: Optional[Dict[str, Optional[str]]] = None):
        self.home = os.path.abspath(home)
        self.cwd = os.path.abspath(cwd or home)
        self.config_path = os.path.abspath(config_path)
        self.extra_env = dict(extra_env or {})
        with open(self.config_path, encoding="utf-8") as f:
            props = parse_config_properties(f.read())
        self.inference_url = props["inference_address"]
        self.management_url = props["management_address"]
        self.metrics_url = props.get("metrics_address")
        self.client = TorchServeClient(self.inference_url, self.management_url, home=self.cwd)

    @classmethod
    def from_catalog(cls, home: str, catalog: Catalog, model_store: str, load_models: bool = False,
                     extra_env: Optional[Dict[str, Optional[str]]] = None, **overrides) -> "TorchServe":
        """A server configured as config.properties is, but on free ports, with its own store,
        and (unless ``load_models``) with no model loaded at start."""
        settings = {**local_addresses(), "model_store": os.path.abspath(model_store), **overrides}
        if "metrics_config" in catalog.server:  # relative to the project root, not to home
            settings.setdefault("metrics_config", os.path.join(ROOT, catalog.server["metrics_config"]))
        if not load_models:
            catalog = Catalog(server=catalog.server, models=[])
        os.makedirs(home, exist_ok=True)
        config_path = os.path.join(home, "config.properties")
        with open(config_path, "w", encoding="utf-8") as f:
            f.write(render_config_properties(catalog, settings, header=False))
        return cls(home, config_path, extra_env=extra_env)

    @property
    def env(self) -> dict:
        tmp = os.path.join(self.home, "tmp")
        os.makedirs(tmp, exist_ok=True)
        env = dict(os.environ)
        env.update(TMPDIR=tmp, TEMP=tmp, LOG_LOCATION=os.path.join(self.home, "logs"),
                   METRICS_LOCATION=os.path.join(self.home, "logs"))
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        for name, value in self.extra_env.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env

    def pid(self) -> Optional[int]:
        try:
            with open(os.path.join(self.home, "tmp", ".model_server.pid")) as f:
                pid = int(f.read().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:  # a stale pid file may name a pid that another program now has
            alive = "org.pytorch.serve.ModelServer" in psutil.Process(pid).cmdline()
        except psutil.Error:
            alive = False
        return pid if alive else None

    def start(self, timeout_s: float = 120.0) -> None:
        check_java()
        os.makedirs(os.path.join(self.home, "logs"), exist_ok=True)
        console = os.path.join(self.home, "logs", "console.log")
        # The Java frontend inherits stdout/stderr: a file, not a pipe, or we would wait on it.
        with open(console, "wb") as out:
            result = subprocess.run([*torchserve_command(), "--start", "--ts-config", self.config_path,
                                     "--ncs"], cwd=self.cwd, env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    timeout=timeout_s)
        with open(console, errors="replace") as f:
            said = f.read()[-2000:]
        if result.returncode != 0 or "already running" in said:
            raise RuntimeError(f"torchserve --start failed: {said}")
        deadline = time.monotonic() + timeout_s
        while True:  # any HTTP answer (400 without a key included) means the frontend is up
            try:
                requests.get(self.inference_url + "/ping", timeout=2)
                return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline or self.pid() is None:
                raise RuntimeError(f"TorchServe did not come up; see {self.home}/logs:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.3)

    def stop(self, timeout_s: float = 60.0) -> None:
        """`torchserve --stop` (a SIGTERM to the frontend), then wait for the frontend and its
        workers to exit; whatever is still alive at the deadline is killed."""
        pid = self.pid()
        processes = []
        if pid:
            try:
                frontend = psutil.Process(pid)
                processes = [frontend, *frontend.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        subprocess.run([*torchserve_command(), "--stop"], cwd=self.cwd, env=self.env,
                       capture_output=True, text=True, timeout=timeout_s)
        _, alive = psutil.wait_procs(processes, timeout=timeout_s)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGKILL)
        psutil.wait_procs(alive, timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for name in ("ts_log.log", "model_log.log"):
            path = os.path.join(self.home, "logs", name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out.append(f"--- {name}\n" + "".join(f.readlines()[-lines:]))
        return "\n".join(out)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


SERVER_HOME = os.path.join(ROOT, ".serve")  # pid file and temporary files of `make serve`


def project_server() -> TorchServe:
    """`make serve`'s server (scripts/serving/serve.py), run from the project root as `torchserve --start`
    would be: key_file.json lands there and model_store=model_store resolves to ./model_store."""
    return TorchServe(SERVER_HOME, CONFIG_PROPERTIES_PATH, cwd=ROOT)
