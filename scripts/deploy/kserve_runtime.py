"""The KServe runtime's container (serve_runtime: TorchServe from the repository, then the v1
wrapper in front of it) and its local rehearsal on the written layout."""
import base64
import json
import os
import signal
import subprocess
import sys
import time
from typing import List, Optional

import requests

from models.families import resolve, samples_of
from models.catalog import ROOT, Catalog, ModelEntry
from scripts.serving.ts_server import TorchServe, check_java, free_port
from scripts.deploy.kserve_common import (DeployError, ENVELOPES, HTTP_PORT, MOUNT, RUNTIME_COMMAND,
                                   SERVE_START_TIMEOUT_S, read_properties)
from scripts.deploy.kserve_manifests import runtime_args


# ---------------------------------------------------------------------------------------------
# In the runtime's container: TorchServe from the repository, then the v1 wrapper in front of it


def _say(message: str) -> None:
    print(f"kserve-runtime: {message}", file=sys.stderr, flush=True)


def snapshot_models(props: dict) -> List[str]:
    """Names of the models the config's model_snapshot loads at start (one version each: the
    repository's; TorchServe describes it as the model's default, GET /models/<name>)."""
    if "model_snapshot" not in props:
        raise DeployError("the config has no model_snapshot: not written by `python -m scripts.deploy.kserve`")
    return list(json.loads(props["model_snapshot"])["models"])


def _stop_torchserve(process: subprocess.Popen, env: dict, timeout_s: float = 60.0) -> None:
    """`torchserve --stop --foreground` (SIGTERM to the Java frontend, waits for it), then the
    wrapper process; whatever is left at the deadline is killed with the frontend's children."""
    import psutil
    frontend = []
    try:
        with open(os.path.join(env["TMPDIR"], ".model_server.pid")) as f:
            java = psutil.Process(int(f.read().strip()))
        frontend = [java, *java.children(recursive=True)]
    except (OSError, ValueError, psutil.Error):
        pass
    subprocess.run(["torchserve", "--stop", "--foreground"], env=env, capture_output=True, timeout=timeout_s + 10)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
    _, alive = psutil.wait_procs(frontend, timeout=10)
    for leftover in alive:
        try:
            leftover.kill()
        except psutil.Error:
            pass


def serve_runtime(config_path: str, http_port: int = HTTP_PORT) -> int:
    """What the runtime's container runs (RUNTIME_COMMAND + runtime_args()): TorchServe in the
    foreground with ``config_path``, then, once every model of its model_snapshot has a READY
    worker (what the KServe wrappers of TorchServe wait for), run_wrapper on ``http_port``.
    SIGTERM/SIGINT stop the wrapper, then TorchServe, and return 0; either process exiting on its
    own, or TorchServe not ready within SERVE_START_TIMEOUT seconds, returns 1 (the container is
    restarted). The environment comes from the runtime (runtime_env)."""
    from scripts.serving.ts_client import TorchServeClient
    with open(config_path, encoding="utf-8") as f:
        props = read_properties(f.read())
    models = snapshot_models(props)
    env = dict(os.environ)
    if env.get("TS_SERVICE_ENVELOPE") not in ENVELOPES.values():
        _say(f"TS_SERVICE_ENVELOPE is {env.get('TS_SERVICE_ENVELOPE')!r}: the runtime sets it "
             f"({', '.join(f'{v} for {k}' for k, v in ENVELOPES.items())})")
        return 2
    env.setdefault("TMPDIR", "/tmp")
    env.setdefault("TEMP", env["TMPDIR"])
    env.setdefault("LOG_LOCATION", os.path.join(env["TMPDIR"], "torchserve-kserve", "logs"))
    env.setdefault("METRICS_LOCATION", env["LOG_LOCATION"])
    env["PATH"] = env.get("PATH", "") + os.pathsep + os.path.dirname(sys.executable)  # torchserve
    for folder in (env["TMPDIR"], env["LOG_LOCATION"], env["METRICS_LOCATION"]):
        os.makedirs(folder, exist_ok=True)
    timeout_s = float(env.get("SERVE_START_TIMEOUT", SERVE_START_TIMEOUT_S))
    stopping: List[str] = []

    def stop(signum, _frame):
        stopping.append(signal.Signals(signum).name)
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}

    _say(f"starting TorchServe with {config_path} ({', '.join(models)})")
    torchserve = subprocess.Popen(["torchserve", "--start", "--foreground", "--ncs", "--ts-config", config_path],
                                  env=env, stdin=subprocess.DEVNULL)
    wrapper = None
    failure = None
    try:
        client = TorchServeClient(props["inference_address"], props["management_address"], home=os.getcwd())
        deadline = time.monotonic() + timeout_s
        while wrapper is None and not stopping:
            if torchserve.poll() is not None:
                failure = f"TorchServe exited ({torchserve.returncode}) before its models were ready"
                break
            if time.monotonic() > deadline:
                failure = f"TorchServe's models not ready after {timeout_s:.0f} s"
                break
            try:
                client.wait_ready(models, timeout_s=2)
            except TimeoutError:
                continue
            host = props["inference_address"].split("//", 1)[1]
            _say(f"models ready; the v1 wrapper on port {http_port} forwards to {host}")
            wrapper = subprocess.Popen(
                [sys.executable, "-c", "from scripts.deploy.kserve import run_wrapper; run_wrapper()", host,
                 str(http_port), ",".join(models)],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL)
        while failure is None and not stopping:
            if torchserve.poll() is not None:
                failure = f"TorchServe exited on its own ({torchserve.returncode}); see {env['LOG_LOCATION']}"
            elif wrapper.poll() is not None:
                failure = f"the v1 wrapper exited on its own ({wrapper.returncode})"
            else:
                time.sleep(0.5)
    finally:
        if wrapper is not None and wrapper.poll() is None:
            wrapper.terminate()  # the ModelServer finishes the requests in flight
            try:
                wrapper.wait(30)
            except subprocess.TimeoutExpired:
                wrapper.kill()
                wrapper.wait(10)
        if torchserve.poll() is None:
            _stop_torchserve(torchserve, env)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure:
        _say(failure)
        return 1
    _say(f"stopped ({stopping[0]})")
    return 0


def run_wrapper() -> None:
    """The v1 wrapper: a KServe ModelServer (kserve SDK) whose models (kserve.Model with a
    predictor host) forward /v1/models/<name>:predict to TorchServe. argv: predictor host:port,
    HTTP port, model names. serve_runtime starts it once TorchServe's workers are READY."""
    from kserve import Model, ModelServer
    from kserve.predictor_config import PredictorConfig
    predictor_host, http_port, names = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
    models = []
    for name in names:
        model = Model(name)
        model.ready = True  # started once TorchServe's workers are READY
        models.append(model)
    config = PredictorConfig(predictor_host=predictor_host, predictor_protocol="v1")
    ModelServer(http_port=http_port, enable_grpc=False, predictor_config=config).start(models)


# ---------------------------------------------------------------------------------------------
# Local rehearsal: the runtime's command, on the written layout


def rehearsal_config(config_text: str, repo: str) -> str:
    """The runtime's config.properties with /mnt/models replaced by ``repo`` and every port by
    a free 127.0.0.1 port; everything else as written."""
    port = free_port()
    replacements = {
        "inference_address": f"http://127.0.0.1:{port}",
        "management_address": f"http://127.0.0.1:{port}",  # one port for both, as in the pod
        "metrics_address": f"http://127.0.0.1:{free_port()}",
        "grpc_inference_port": str(free_port()),
        "grpc_management_port": str(free_port()),
    }
    lines = []
    for line in config_text.splitlines():
        key = line.split("=", 1)[0] if "=" in line and not line.startswith("#") else None
        if key in replacements:
            line = f"{key}={replacements[key]}"
        elif key:
            line = line.replace(MOUNT, os.path.abspath(repo))
        lines.append(line)
    return "\n".join(lines) + "\n"


class RuntimeRehearsal(TorchServe):
    """The runtime's container, rehearsed: RUNTIME_COMMAND + runtime_args() (serve_runtime) with
    a copy of the repository's config (rehearsal_config: local paths, free ports), the runtime's
    TS_SERVICE_ENVELOPE, and this home for its temporary files and logs. ``wrapper_url`` is the
    pod's port 8080, ``inference_url`` TorchServe's 8085."""

    def __init__(self, home: str, repo: str, protocol: str = "v1"):
        os.makedirs(home, exist_ok=True)
        with open(os.path.join(repo, "config", "config.properties"), encoding="utf-8") as f:
            text = rehearsal_config(f.read(), repo)
        config_path = os.path.join(home, "config.properties")
        with open(config_path, "w", encoding="utf-8") as f:
            f.write(text)
        super().__init__(home, config_path)
        self.models = list(json.loads(read_properties(text)["model_snapshot"])["models"])
        self.runtime_env = {"TS_SERVICE_ENVELOPE": ENVELOPES[protocol]}
        self.http_port = free_port()
        self.wrapper_url = f"http://127.0.0.1:{self.http_port}"
        self.command = [sys.executable, "-m", "scripts.deploy.kserve", *runtime_args(config_path, self.http_port)]
        self.exit_code = None  # the runtime command's, once stopped
        self._runtime = None

    @property
    def env(self) -> dict:
        return {**super().env, **self.runtime_env, "PYTHONPATH": ROOT}

    def start(self, timeout_s: float = 600.0) -> None:
        check_java()
        os.makedirs(os.path.join(self.home, "logs"), exist_ok=True)
        env = {**self.env, "SERVE_START_TIMEOUT": str(int(timeout_s))}
        with open(os.path.join(self.home, "logs", "runtime.log"), "wb") as log:
            self._runtime = subprocess.Popen(self.command, cwd=self.cwd, env=env, stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s + 60
        while True:
            try:
                if requests.get(self.wrapper_url + "/", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if self._runtime.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the runtime's command did not come up (exit {self._runtime.poll()}); "
                                   f"see {self.home}/logs/runtime.log")
            time.sleep(0.5)

    def stop(self, timeout_s: float = 90.0) -> None:
        """SIGTERM to the runtime's command, as the kubelet sends; what is left after it is
        stopped the way TorchServe.stop stops a server."""
        if self._runtime is not None:
            if self._runtime.poll() is None:
                self._runtime.send_signal(signal.SIGTERM)
                try:
                    self._runtime.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self._runtime.kill()
                    self._runtime.wait(10)
            self.exit_code = self._runtime.returncode
            self._runtime = None
        if self.pid():
            super().stop(timeout_s)


def v1_predict(inference_url: str, model: str, instances: list, timeout: float = 120) -> requests.Response:
    """KServe's v1 protocol: POST /v1/models/<model>:predict {"instances": [...]}."""
    return requests.post(f"{inference_url}/v1/models/{model}:predict", json={"instances": instances},
                         timeout=timeout)


def image_instance(data: bytes) -> dict:
    """One image as a v1 instance: the binary value as {"b64": ...} (KServe's v1 convention)
    under "data". The envelope hands each instance to the handler as one request; a plain
    {"data": "<base64>"} (TorchServe's KServe examples) works too."""
    return {"data": {"b64": base64.b64encode(data).decode()}}


def rehearsal_instance(entry: ModelEntry) -> Optional[dict]:
    """One v1 instance for ``entry``, as its family's samples declare it (models/families.py):
    None where there is nothing to send (a readiness check instead)."""
    return resolve(samples_of(entry).rehearsal)()


def _sample_instance(file_name: str) -> Optional[dict]:
    sample = os.path.join(ROOT, "build", "samples", file_name)
    if not os.path.exists(sample):
        return None
    with open(sample, "rb") as f:
        return image_instance(f.read())


def photo_instance() -> Optional[dict]:
    """A photograph (build/samples, written by `make build`)."""
    return _sample_instance("china.jpg")


def digit_instance() -> Optional[dict]:
    """A held-out digit PNG (build/samples, written by `make build`)."""
    return _sample_instance("digit_7_0.png")


def sentence_instance() -> dict:
    return {"data": "KServe forwards this sentence to TorchServe."}


def row_instance() -> None:
    """Tabular models get the readiness check only (as before the family declarations)."""
    return None


def rehearse(repo: str, home: str, catalog: Catalog, log=print) -> int:
    """Run the runtime's command on ``repo`` as the container does, send one v1 request per
    model, stop it with SIGTERM."""
    server = RuntimeRehearsal(home, repo)
    log(f"rehearsal: {' '.join(RUNTIME_COMMAND + runtime_args())} on {os.path.relpath(repo, ROOT)} "
        f"(logs in {os.path.relpath(home, ROOT)}/logs) ...")
    failures = 0
    server.start()
    try:
        for name in server.models:
            instance = rehearsal_instance(catalog.model(name))
            if instance is None:
                ready = requests.get(f"{server.wrapper_url}/v1/models/{name}", timeout=10)
                log(f"  GET {server.wrapper_url}/v1/models/{name} -> {ready.status_code} {ready.text[:80]}")
                failures += ready.status_code != 200
                continue
            response = v1_predict(server.wrapper_url, name, [instance])
            failures += response.status_code != 200
            log(f"  POST {server.wrapper_url}/v1/models/{name}:predict -> {response.status_code} "
                f"{response.text[:160]}")
    finally:
        server.stop()
    failures += server.exit_code != 0
    log(f"rehearsal: runtime command exited {server.exit_code} on SIGTERM; "
        + ("every request answered" if not failures else f"{failures} failure(s)"))
    return 1 if failures else 0
