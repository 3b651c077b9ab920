"""KServe deployment: a model repository laid out for KServe's TorchServe runtime, its
config.properties and InferenceService manifests, all derived from models/catalog.yaml.

    python -m scripts.kserve [--out build/kserve] [--storage-uri pvc://claim/path | gs://bucket/path]
                             [--canary-version [MODEL=]VERSION] [--rehearse]

writes  <out>/model-repo/config/config.properties   (what the runtime starts TorchServe with)
        <out>/model-repo/model-store/*.mar           (hard links to model_store's archives)
        <out>/inferenceservice-cpu.yaml, <out>/inferenceservice-gpu.yaml
        <out>/model-repo-canary/... and <out>/inferenceservice-canary.yaml (with --canary-version)
        <out>/capacity.md                             (replicas per request rate, from make bench)
and prints what to run next. ``--rehearse`` then starts TorchServe locally from the written
layout (ports and paths rewritten, the envelope KServe sets) and sends one v1 request per model.

How KServe's TorchServe runtime (ClusterServingRuntime ``kserve-torchserve``, image
pytorch/torchserve-kfs) runs a model repository:
  - the storage initializer copies storageUri to /mnt/models; the container runs
    ``torchserve --start --model-store=/mnt/models/model-store
    --ts-config=/mnt/models/config/config.properties``, with TS_SERVICE_ENVELOPE=kserve for the
    v1 protocol (kservev2 for v2), which TorchServe reads because enable_envvars_config=true;
  - the image's KServe wrapper (a KServe ModelServer) listens on 8080 (gRPC 8081), reads the same
    config.properties (one ``key=value`` per line: model_snapshot must be one line of JSON) and
    forwards /v1/models/<name>:predict to TorchServe's inference address, port 8085;
  - it declares a model ready once TorchServe's management API (same port, 8085) lists a READY
    worker; metrics are scraped from port 8082 (prometheus.kserve.io/port).
"""
import argparse
import base64
import json
import math
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import requests
import yaml

from scripts.catalog import ROOT, MODEL_STORE, Catalog, ModelEntry, load_catalog, models_property
from scripts.ts_server import TorchServe, free_port

# ---------------------------------------------------------------------------------------------

# Facts of KServe's TorchServe runtime and its torchserve-kfs image (see the docstring).
MOUNT = "/mnt/models"
TORCHSERVE_PORT = 8085        # inference and management; the wrapper owns 8080 (HTTP) and 8081 (gRPC)
METRICS_PORT = 8082           # the runtime's prometheus.kserve.io/port
GRPC_PORTS = (7070, 7071)     # TorchServe's own gRPC (inference, management)
ENVELOPES = {"v1": "kserve", "v2": "kservev2"}   # TS_SERVICE_ENVELOPE per protocolVersion
BENCH_PATH = os.path.join(ROOT, "build", "bench", "latest.json")


class DeployError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------
# What is served


def served_entries(catalog: Catalog, canary: Optional[Dict[str, str]] = None) -> List[ModelEntry]:
    """One entry per model served at start: its default version, or the canary's version.

    KServe's v1 path /v1/models/<name>:predict has no version: TorchServe answers it with the
    default version, so other versions would hold workers nobody can reach. A new version goes
    out as a canary revision whose repository serves it as the default."""
    canary = dict(canary or {})
    chosen = []
    for name, versions in models_property(catalog.loaded_at_start).items():
        wanted = canary.pop(name, None)
        if wanted is None:
            defaults = [v for v, settings in versions.items() if settings["defaultVersion"]]
            if len(defaults) != 1:
                raise DeployError(f"model {name} needs exactly one default version, got {defaults}")
            wanted = defaults[0]
        chosen.append(catalog_entry(catalog, name, wanted))
    if canary:
        raise DeployError(f"canary for {', '.join(canary)}: not served at start "
                          f"(served: {', '.join(m.name for m in chosen)})")
    return chosen


def catalog_entry(catalog: Catalog, name: str, version: str) -> ModelEntry:
    for entry in catalog.models:
        if entry.name == name and entry.version == version and entry.variant == "fp32":
            return entry
    known = ", ".join(m.version for m in catalog.models if m.name == name and m.variant == "fp32")
    raise DeployError(f"model {name} has no version {version!r} in the catalog (versions: {known or 'none'})")


def parse_canary(value: Optional[str], catalog: Catalog) -> Dict[str, str]:
    """``MODEL=VERSION``, or ``VERSION`` for every model served at start that has that version."""
    if not value:
        return {}
    if "=" in value:
        name, version = value.split("=", 1)
        return {name: version}
    names = {m.name for m in catalog.loaded_at_start}
    found = {m.name: value for m in catalog.models
             if m.name in names and m.version == value and m.variant == "fp32"}
    if not found:
        raise DeployError(f"no model served at start has a version {value!r}")
    return found


# ---------------------------------------------------------------------------------------------
# config.properties for the runtime


def kserve_models_property(entries: Sequence[ModelEntry]) -> Dict[str, dict]:
    """models_property of the served entries, as the runtime must run them: each model's one
    version is its default, and TorchServe does not batch requests (batchSize 1).

    Under the kserve envelope TorchServe must not put two requests in one batch: the envelope
    answers only the first request of a batch and TorchServe fails them all with 503 "number of
    batch response mismatched" (pytorch/serve#1302, #2158). Batching comes from the instances of
    one request instead: the envelope hands them all to the handler as one batch."""
    models = models_property(list(entries))
    for name, versions in models.items():
        if len(versions) != 1:
            raise DeployError(f"model {name}: one version per model in a KServe revision, got {list(versions)}")
        for settings in versions.values():
            settings.update(defaultVersion=True, batchSize=1)
    return models


def runtime_settings(catalog: Catalog) -> dict:
    """The catalog's server settings, with the runtime's addresses and paths."""
    settings = dict(catalog.server)
    settings.update({
        # 127.0.0.1: only the wrapper in the same pod talks to TorchServe, whose APIs run
        # without a key here.
        "inference_address": f"http://127.0.0.1:{TORCHSERVE_PORT}",
        "management_address": f"http://127.0.0.1:{TORCHSERVE_PORT}",
        "metrics_address": f"http://0.0.0.0:{METRICS_PORT}",
        "grpc_inference_address": "127.0.0.1", "grpc_inference_port": GRPC_PORTS[0],
        "grpc_management_address": "127.0.0.1", "grpc_management_port": GRPC_PORTS[1],
        "enable_envvars_config": True,
        "disable_token_authorization": True,
        "enable_model_api": False,
        "enable_metrics_api": True,
        "metrics_mode": "prometheus",
        "model_store": f"{MOUNT}/model-store",
    })
    if catalog.server.get("metrics_config"):
        settings["metrics_config"] = f"{MOUNT}/config/{os.path.basename(catalog.server['metrics_config'])}"
    return settings


CONFIG_HEADER = """\
# Generated by `python -m scripts.kserve` from models/catalog.yaml. Do not edit by hand.
# For KServe's TorchServe runtime (kserve-torchserve), which starts TorchServe with this file
# from the storageUri copied to /mnt/models, and sets TS_SERVICE_ENVELOPE (kserve for protocol
# v1) through enable_envvars_config. The image's KServe wrapper serves the pod's port 8080 and
# forwards /v1/models/NAME:predict to TorchServe on 127.0.0.1 port 8085.
# Token authorization is off (disable_token_authorization): the wrapper calls TorchServe without
# a key (it checks readiness on the management API), and kubelet probes cannot carry one. No key
# file is written. TorchServe listens on 127.0.0.1 only, so its management API is unreachable
# from outside the pod; clients and probes reach the wrapper on 8080 (GET /v1/models/NAME says
# whether NAME is ready), and requests are authenticated in front of KServe (ingress/mesh).
# Metrics (Prometheus text) are on 0.0.0.0 port 8082 for the runtime's scrape annotations.
# batchSize is 1: under the kserve envelope TorchServe must not batch separate requests (it
# would answer only the first of a batch, the rest fail with 503). Send several instances in
# one request to batch them: the handler runs them as one batch.
# Each model serves one version (its default): the v1 path names no version; a new version goes
# out as a canary revision (inferenceservice-canary.yaml).
"""


def render_kserve_config(catalog: Catalog, entries: Sequence[ModelEntry]) -> str:
    """config.properties for the runtime. No comment line holds '=': the wrapper reads every
    line with '=' as a setting, comments included."""
    lines = [*CONFIG_HEADER.splitlines()]
    for key, value in runtime_settings(catalog).items():
        lines.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    models = kserve_models_property(entries)
    snapshot = {"name": "startup.cfg", "modelCount": len(models), "models": models}
    lines.append("model_snapshot=" + json.dumps(snapshot, separators=(",", ":")))
    bad = [line for line in lines if line.startswith("#") and "=" in line]
    if bad:
        raise DeployError(f"comment lines must not hold '=' (the KServe wrapper reads them): {bad[0]}")
    return "\n".join(lines) + "\n"


def read_properties(text: str) -> dict:
    """config.properties as the KServe wrapper reads it: every line with '=' is a setting."""
    props = {}
    for line in text.splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


# ---------------------------------------------------------------------------------------------
# The model repository


def link_or_copy(source: str, target: str) -> None:
    if os.path.lexists(target):
        os.remove(target)
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(source, target)


def write_model_repo(repo: str, catalog: Catalog, entries: Sequence[ModelEntry],
                     model_store: str = MODEL_STORE) -> str:
    """<repo>/config/config.properties and <repo>/model-store/<archive>.mar for ``entries``;
    archives of earlier runs that are no longer served are removed. Returns the config path."""
    missing = [m.mar_name for m in entries if not os.path.exists(os.path.join(model_store, m.mar_name))]
    if missing:
        raise DeployError(f"archives {missing} are missing from {model_store}: run `make build`")
    config_dir, store_dir = os.path.join(repo, "config"), os.path.join(repo, "model-store")
    os.makedirs(config_dir, exist_ok=True)
    os.makedirs(store_dir, exist_ok=True)
    wanted = {m.mar_name for m in entries}
    for name in os.listdir(store_dir):
        if name not in wanted:
            os.remove(os.path.join(store_dir, name))
    for entry in entries:
        link_or_copy(os.path.join(model_store, entry.mar_name), os.path.join(store_dir, entry.mar_name))
    if catalog.server.get("metrics_config"):
        source = os.path.join(ROOT, catalog.server["metrics_config"])
        shutil.copy2(source, os.path.join(config_dir, os.path.basename(source)))
    config_path = os.path.join(config_dir, "config.properties")
    with open(config_path, "w", encoding="utf-8") as f:
        f.write(render_kserve_config(catalog, entries))
    return config_path


# ---------------------------------------------------------------------------------------------
# InferenceService manifests


def inference_service(name: str, storage_uri: str, image: str, profile: dict, timeout_s: int,
                      protocol: str = "v1", runtime: str = "kserve-torchserve",
                      canary_traffic_percent: Optional[int] = None) -> dict:
    """An InferenceService running the model repository at ``storage_uri`` on the TorchServe
    runtime; ``profile`` holds resources, replicas and the autoscaling metric."""
    predictor = {
        "minReplicas": profile["min_replicas"],
        "maxReplicas": profile["max_replicas"],
        "scaleMetric": profile["scale_metric"],
        "scaleTarget": profile["scale_target"],
        "timeout": timeout_s,
    }
    if canary_traffic_percent is not None:
        predictor["canaryTrafficPercent"] = canary_traffic_percent
    predictor["model"] = {
        "modelFormat": {"name": "pytorch"},
        "protocolVersion": protocol,
        "runtime": runtime,
        "image": image,
        "storageUri": storage_uri,
        "resources": json.loads(json.dumps(profile["resources"])),
    }
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": name}, "spec": {"predictor": predictor}}


def request_timeout_s(entries: Sequence[ModelEntry]) -> int:
    """The predictor's request timeout: the longest responseTimeout of the served models."""
    return max(m.serving["responseTimeout"] for m in entries)


def canary_storage_uri(storage_uri: str) -> str:
    return storage_uri.rstrip("/") + "-canary"


def _sdk_class(type_name: str):
    import kubernetes.client.models
    import kserve.models
    for module in (kserve.models, kubernetes.client.models):
        if hasattr(module, type_name):
            return getattr(module, type_name)
    return None


PRIMITIVES = {"str": str, "int": int, "float": (int, float), "bool": bool}


def to_sdk_model(data, type_name: str, path: str = "$"):
    """``data`` (parsed YAML) as the KServe SDK's model objects (Kubernetes types from the
    kubernetes client, as the SDK uses them). A field the model does not have, or a value of the
    wrong type, raises DeployError naming its path."""
    if type_name.startswith("list["):
        if not isinstance(data, list):
            raise DeployError(f"{path}: expected a list, got {type(data).__name__}")
        return [to_sdk_model(item, type_name[5:-1], f"{path}[{i}]") for i, item in enumerate(data)]
    if type_name.startswith("dict("):
        if not isinstance(data, dict):
            raise DeployError(f"{path}: expected a mapping, got {type(data).__name__}")
        value_type = type_name[5:-1].split(", ", 1)[1]
        return {k: to_sdk_model(v, value_type, f"{path}.{k}") for k, v in data.items()}
    if type_name in PRIMITIVES:
        expected = PRIMITIVES[type_name]
        if isinstance(data, bool) != (type_name == "bool") or not isinstance(data, expected):
            raise DeployError(f"{path}: expected {type_name}, got {data!r}")
        return data
    klass = _sdk_class(type_name)
    if klass is None:  # object, ResourceQuantity, IntOrString...: free-form values
        return data
    if not isinstance(data, dict):
        raise DeployError(f"{path}: expected a {type_name} mapping, got {type(data).__name__}")
    fields = {json_key: attr for attr, json_key in klass.attribute_map.items()}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise DeployError(f"{path}: {type_name} has no field '{unknown[0]}' "
                          f"(fields: {', '.join(sorted(fields))})")
    kwargs = {fields[k]: to_sdk_model(v, klass.openapi_types[fields[k]], f"{path}.{k}")
              for k, v in data.items()}
    try:
        return klass(**kwargs)
    except ValueError as exc:  # the SDK's own checks (required fields, enums)
        raise DeployError(f"{path}: {exc}") from None


def lost_in_round_trip(original, again, path: str = "$") -> List[str]:
    """Paths of ``original`` that ``again`` drops or changes (fields ``again`` adds, the SDK's
    defaults such as a model's empty name, are allowed)."""
    if isinstance(original, dict) and isinstance(again, dict):
        return [lost for key, value in original.items()
                for lost in (lost_in_round_trip(value, again[key], f"{path}.{key}") if key in again
                             else [f"{path}.{key} (dropped)"])]
    if isinstance(original, list) and isinstance(again, list) and len(original) == len(again):
        return [lost for i, (a, b) in enumerate(zip(original, again))
                for lost in lost_in_round_trip(a, b, f"{path}[{i}]")]
    return [] if original == again and type(original) is type(again) else [f"{path}: {original!r} -> {again!r}"]


def check_manifest(manifest: dict):
    """The manifest as a kserve V1beta1InferenceService: every field must be one the SDK's
    models have, and come back unchanged from the SDK's serializer. Returns the SDK object."""
    from kserve.api_client import ApiClient
    service = to_sdk_model(manifest, "V1beta1InferenceService")
    lost = lost_in_round_trip(manifest, ApiClient().sanitize_for_serialization(service))
    if lost:
        raise DeployError(f"the KServe SDK does not give the manifest back unchanged: {'; '.join(lost)}")
    return service


MANIFEST_HEADER = """\
# Generated by `python -m scripts.kserve` from models/catalog.yaml. Do not edit by hand.
# Checked against the kserve SDK's V1beta1InferenceService model when written.
"""


def write_manifest(path: str, manifest: dict, note: str = "") -> None:
    check_manifest(manifest)
    with open(path, "w", encoding="utf-8") as f:
        f.write(MANIFEST_HEADER + "".join(f"# {line}\n" for line in note.splitlines()))
        yaml.safe_dump(manifest, f, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Capacity


def replicas_needed(rate: float, per_replica_throughput: float, headroom: float) -> int:
    """Replicas that serve ``rate`` requests/s when one replica serves at most
    ``per_replica_throughput`` and a ``headroom`` fraction of each is kept free (bursts, a
    replica lost or restarting): ceil(rate / (throughput x (1 - headroom))), at least 1."""
    if rate < 0 or per_replica_throughput <= 0 or not 0 <= headroom < 1:
        raise ValueError("need rate >= 0, per_replica_throughput > 0 and 0 <= headroom < 1")
    usable = per_replica_throughput * (1 - headroom)
    return max(1, math.ceil(rate / usable - 1e-9))  # 1e-9: 7 / (10 x 0.7) is not 1.0000000001


def replicas_for_mix(rates: Dict[str, float], throughputs: Dict[str, float], headroom: float) -> int:
    """Replicas for several models sharing each replica: the fractions of a replica each
    model's traffic takes add up."""
    load = sum(rate / throughputs[name] for name, rate in rates.items())
    return replicas_needed(load, 1.0, headroom)


def load_bench(path: str = BENCH_PATH) -> dict:
    if not os.path.exists(path):
        raise DeployError(f"{path} is missing: run `make bench` first")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def served_throughputs(bench: dict, entries: Sequence[ModelEntry]) -> Dict[str, float]:
    """Model name -> measured served img/s of the archive it is served with (served models the
    benchmark did not measure are left out)."""
    out = {}
    archives = {m.mar_name: m.name for m in entries}
    for rows in (bench.get("archive_variants") or {}).values():
        for row in rows:
            served = row.get("served") or {}
            throughput = served.get("throughput_items_s") or served.get("throughput_img_s")
            if row.get("archive") in archives and throughput:
                out[archives[row["archive"]]] = float(throughput)
    return out


def capacity_markdown(bench: dict, entries: Sequence[ModelEntry], rates: Sequence[float],
                      headroom: float) -> str:
    throughputs = served_throughputs(bench, entries)
    if not throughputs:
        raise DeployError("the benchmark has no served figures for the models served at start")
    head = "| model | archive | served req/s per replica | " + " | ".join(f"{r:g} req/s" for r in rates) + " |"
    lines = [
        f"Replicas needed per request rate, each replica like the benchmark's machine "
        f"({bench.get('machine', '?')}; {bench.get('cpu_count', '?')} cores), "
        f"{headroom:.0%} headroom: replicas = ceil(rate / (throughput x {1 - headroom:g})).",
        f"Throughput: `make bench` of {bench.get('started', '?')}, served through TorchServe at "
        f"concurrency {bench.get('concurrency', '?')}, {bench.get('seconds', '?')} s per row, one image "
        f"per request.", "", head, "|---|---|---:|" + "---:|" * len(rates)]
    for entry in entries:
        if entry.name not in throughputs:
            continue
        cells = [str(replicas_needed(r, throughputs[entry.name], headroom)) for r in rates]
        lines.append(f"| {entry.name} {entry.version} | {entry.mar_name} | {throughputs[entry.name]:.1f} | "
                     + " | ".join(cells) + " |")
    left_out = [m.name for m in entries if m.name not in throughputs]
    if left_out:
        lines += ["", f"Not measured by the benchmark: {', '.join(left_out)}."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Local rehearsal: TorchServe from the written layout, as the runtime starts it


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
    """TorchServe started from a model repository's config with the environment the runtime
    gives it (TS_SERVICE_ENVELOPE for the protocol), then the wrapper in front of it, as in
    the pod: ``wrapper_url`` is the pod's port 8080, ``inference_url`` TorchServe's 8085."""

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
        self.wrapper_url = f"http://127.0.0.1:{free_port()}"
        self._wrapper = None

    @property
    def env(self) -> dict:
        return {**super().env, **self.runtime_env}

    def start(self, timeout_s: float = 600.0) -> None:
        super().start(timeout_s)
        self.client.wait_ready(self.models, timeout_s)  # what the wrapper's model.load() waits for
        log = open(os.path.join(self.home, "logs", "wrapper.log"), "wb")
        self._wrapper = subprocess.Popen(
            [sys.executable, "-c", "from scripts.kserve import run_wrapper; run_wrapper()",
             self.inference_url.split("//", 1)[1], self.wrapper_url.rsplit(":", 1)[1], ",".join(self.models)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(self.wrapper_url + "/", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if self._wrapper.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the KServe wrapper did not come up; see {self.home}/logs/wrapper.log")
            time.sleep(0.5)

    def stop(self, timeout_s: float = 60.0) -> None:
        if self._wrapper is not None:
            self._wrapper.terminate()
            try:
                self._wrapper.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._wrapper.kill()
                self._wrapper.wait(10)
            self._wrapper = None
        super().stop(timeout_s)


def run_wrapper() -> None:
    """The torchserve-kfs image's KServe wrapper as far as the v1 path goes: a KServe
    ModelServer whose models (kserve.Model with a predictor host) forward
    /v1/models/<name>:predict to TorchServe. argv: predictor host:port, HTTP port, model names."""
    from kserve import Model, ModelServer
    from kserve.predictor_config import PredictorConfig
    predictor_host, http_port, names = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
    models = []
    for name in names:
        model = Model(name)
        model.ready = True  # the rehearsal starts it once TorchServe's workers are READY
        models.append(model)
    config = PredictorConfig(predictor_host=predictor_host, predictor_protocol="v1")
    ModelServer(http_port=http_port, enable_grpc=False, predictor_config=config).start(models)


def v1_predict(inference_url: str, model: str, instances: list, timeout: float = 120) -> requests.Response:
    """KServe's v1 protocol: POST /v1/models/<model>:predict {"instances": [...]}."""
    return requests.post(f"{inference_url}/v1/models/{model}:predict", json={"instances": instances},
                         timeout=timeout)


def image_instance(data: bytes) -> dict:
    """One image as a v1 instance: the binary value as {"b64": ...} (KServe's v1 convention)
    under "data". The envelope hands each instance to the handler as one request; a plain
    {"data": "<base64>"} (TorchServe's KServe examples) needs handler_kit/wire.py to decode a
    base64 string field (today: 400 "field 'data' is text")."""
    return {"data": {"b64": base64.b64encode(data).decode()}}


# ---------------------------------------------------------------------------------------------


def write_deployment(out: str, catalog: Catalog, storage_uri: str, deploy: dict,
                     canary: Optional[Dict[str, str]] = None, model_store: str = MODEL_STORE,
                     log=print) -> dict:
    """Writes the layout and manifests under ``out``; returns what was written, by role."""
    if deploy["protocol"] != "v1":  # the handlers take v1 instances; v2 tensors are not mapped
        raise DeployError(f"protocol {deploy['protocol']!r}: only v1 is supported (and rehearsed)")
    written = {}
    entries = served_entries(catalog)
    repo = os.path.join(out, "model-repo")
    written["config"] = write_model_repo(repo, catalog, entries, model_store)
    log(f"wrote {os.path.relpath(repo, ROOT)}/: config/config.properties and model-store/ "
        f"({', '.join(f'{m.name} {m.version}' for m in entries)})")
    timeout = request_timeout_s(entries)
    for kind in ("cpu", "gpu"):
        manifest = inference_service(deploy["name"], storage_uri, deploy["image"][kind], deploy[kind],
                                     timeout, deploy["protocol"], deploy["runtime"])
        path = written[kind] = os.path.join(out, f"inferenceservice-{kind}.yaml")
        write_manifest(path, manifest)
        log(f"wrote {os.path.relpath(path, ROOT)}")
    if canary:
        canary_entries = served_entries(catalog, canary)
        canary_repo = os.path.join(out, "model-repo-canary")
        written["canary_config"] = write_model_repo(canary_repo, catalog, canary_entries, model_store)
        manifest = inference_service(deploy["name"], canary_storage_uri(storage_uri), deploy["image"]["cpu"],
                                     deploy["cpu"], request_timeout_s(canary_entries), deploy["protocol"],
                                     deploy["runtime"], deploy["canary_traffic_percent"])
        path = written["canary"] = os.path.join(out, "inferenceservice-canary.yaml")
        changed = ", ".join(f"{name} {version}" for name, version in canary.items())
        write_manifest(path, manifest, f"Canary: {changed} gets {deploy['canary_traffic_percent']}% of the "
                       "requests; the last ready revision keeps the rest.")
        log(f"wrote {os.path.relpath(canary_repo, ROOT)}/ and {os.path.relpath(path, ROOT)} ({changed})")
    try:
        sheet = capacity_markdown(load_bench(), entries, deploy["capacity_rates"], deploy["headroom"])
    except DeployError as exc:
        log(f"capacity sheet skipped: {exc}")
    else:
        path = written["capacity"] = os.path.join(out, "capacity.md")
        with open(path, "w", encoding="utf-8") as f:
            f.write(sheet)
        log(f"wrote {os.path.relpath(path, ROOT)}")
    return written


def upload_commands(local: str, storage_uri: str) -> List[str]:
    scheme, _, rest = storage_uri.partition("://")
    if scheme == "gs":
        return [f"gsutil -m rsync -r -d {local} {storage_uri}"]
    if scheme == "s3":
        return [f"aws s3 sync --delete {local} {storage_uri}"]
    if scheme == "pvc":
        claim, _, sub = rest.partition("/")
        pod = {"spec": {"containers": [{"name": "copy", "image": "busybox:1.36", "command": ["sleep", "3600"],
                                        "volumeMounts": [{"name": "repo", "mountPath": "/pv"}]}],
                        "volumes": [{"name": "repo", "persistentVolumeClaim": {"claimName": claim}}]}}
        return [f"kubectl run model-repo-copy --image=busybox:1.36 --restart=Never --overrides='{json.dumps(pod)}'",
                "kubectl wait --for=condition=Ready pod/model-repo-copy",
                f"kubectl exec model-repo-copy -- sh -c 'rm -rf /pv/{sub}/config /pv/{sub}/model-store; mkdir -p /pv/{sub}'",
                f"kubectl cp {local}/. model-repo-copy:/pv/{sub}",
                "kubectl delete pod model-repo-copy"]
    return [f"# copy {local}/ to {storage_uri} (config/ and model-store/ at its top)"]


def next_steps(out: str, storage_uri: str, deploy: dict, written: dict) -> str:
    rel = os.path.relpath(out, ROOT)
    name = deploy["name"]
    steps = ["", "Next:", f"  # 1. the runtime image ({deploy['image']['cpu']}), see README 'Deploying on KServe'"]
    steps += ["  # 2. upload the model repository"] + [f"  {c}" for c in upload_commands(f"{rel}/model-repo", storage_uri)]
    steps += ["  # 3. deploy (or inferenceservice-gpu.yaml) and wait",
              f"  kubectl apply -f {rel}/inferenceservice-cpu.yaml",
              f"  kubectl wait --for=condition=Ready inferenceservice/{name} --timeout=15m",
              "  # 4. call it (INGRESS_HOST/PORT: your ingress gateway)",
              f"  SERVICE_HOSTNAME=$(kubectl get inferenceservice {name} -o jsonpath='{{.status.url}}' | cut -d/ -f3)",
              "  echo '{\"instances\": [{\"data\": {\"b64\": \"'$(base64 -w0 build/samples/digit_7_0.png)'\"}}]}' > digits.json",
              '  curl -H "Host: $SERVICE_HOSTNAME" -H "Content-Type: application/json" '
              "http://$INGRESS_HOST:$INGRESS_PORT/v1/models/digits:predict -d @digits.json"]
    if "canary" in written:
        steps += ["  # canary: upload model-repo-canary, then apply; promote with canaryTrafficPercent 100"]
        steps += [f"  {c}" for c in upload_commands(f"{rel}/model-repo-canary", canary_storage_uri(storage_uri))]
        steps += [f"  kubectl apply -f {rel}/inferenceservice-canary.yaml"]
    if "REGISTRY/" in json.dumps(deploy["image"]):
        steps += ["", "Note: the image names are placeholders (REGISTRY/...): set deploy.image to your image."]
    return "\n".join(steps)


def rehearsal_instance(entry: ModelEntry) -> Optional[dict]:
    """One v1 instance for ``entry``: a sample image for an image model, a sentence for a text
    model (None: nothing to send)."""
    if getattr(entry, "family", "image") == "text":
        return {"data": "KServe forwards this sentence to TorchServe."}
    sample = os.path.join(ROOT, "build", "samples", "digit_7_0.png" if entry.name == "digits" else "china.jpg")
    if not os.path.exists(sample):
        return None
    with open(sample, "rb") as f:
        return image_instance(f.read())


def rehearse(repo: str, home: str, catalog: Catalog, log=print) -> int:
    """Start TorchServe and the wrapper from ``repo`` as the runtime does, send one v1 request
    per model, stop."""
    server = RuntimeRehearsal(home, repo)
    log(f"rehearsal: TorchServe from {os.path.relpath(repo, ROOT)}, then the KServe wrapper "
        f"(logs in {os.path.relpath(home, ROOT)}/logs) ...")
    failures = 0
    server.start()
    try:
        for name in server.models:
            instance = rehearsal_instance(catalog.model(name))
            if instance is None:
                log(f"  {name}: ready (no sample to send: run `make build`)")
                continue
            response = v1_predict(server.wrapper_url, name, [instance])
            failures += response.status_code != 200
            log(f"  POST {server.wrapper_url}/v1/models/{name}:predict -> {response.status_code} "
                f"{response.text[:160]}")
    finally:
        server.stop()
    log("rehearsal: " + ("every request answered" if not failures else f"{failures} request(s) failed"))
    return 1 if failures else 0


def main(argv=None) -> int:
    deploy = load_catalog().deploy
    if not deploy:
        raise SystemExit(f"models/catalog.yaml has no deploy: block; see README 'Deploying on KServe'")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "build", "kserve"))
    parser.add_argument("--storage-uri", default=deploy["storage_uri"],
                        help="where the model repository will be: pvc://claim/path, gs://..., s3://...")
    parser.add_argument("--canary-version", help="MODEL=VERSION (or VERSION): also write a canary "
                        "repository and InferenceService serving that version")
    parser.add_argument("--rehearse", action="store_true",
                        help="then start TorchServe locally from the layout and send v1 requests")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    try:
        catalog = load_catalog()
        written = write_deployment(out, catalog, args.storage_uri, deploy, parse_canary(args.canary_version, catalog))
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(next_steps(out, args.storage_uri, deploy, written))
    if args.rehearse:
        return rehearse(os.path.join(out, "model-repo"), os.path.join(out, "rehearsal"), catalog)
    return 0


if __name__ == "__main__":
    sys.exit(main())
