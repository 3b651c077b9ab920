"""KServe deployment on the project's own runtime: a ClusterServingRuntime that runs the project's
serving image, a model repository laid out for it (config.properties and archives), and the
InferenceServices that name that runtime, all derived from models/catalog.yaml.

    python -m scripts.kserve [--out build/kserve] [--storage-uri pvc://claim/path | gs://bucket/path]
                             [--image IMAGE] [--canary-version [MODEL=]VERSION] [--bench FILE]
                             [--rehearse]
    python -m scripts.kserve --record-bench build/bench/latest.json   (figures -> docs/results/bench.json,
                                                                       capacity sheet -> docs/deployment-k8s.md)
    python -m scripts.kserve --serve-runtime CONFIG [--http-port 8080] (what the runtime's container runs)

writes  <out>/clusterservingruntime.yaml              (the runtime: apply once per cluster)
        <out>/model-repo/config/config.properties   (what the runtime starts TorchServe with)
        <out>/model-repo/model-store/*.mar           (hard links to model_store's archives)
        <out>/inferenceservice-cpu.yaml, <out>/inferenceservice-gpu.yaml
        <out>/model-repo-canary/... and <out>/inferenceservice-canary.yaml (with --canary-version)
        <out>/capacity.md                             (replicas per request rate, recorded bench)
and prints what to run next. ``--rehearse`` then runs the runtime's command locally against the
written layout (ports and paths rewritten) and sends one v1 request per model.

How the runtime (deploy.runtime of the catalog; its container CONTAINER) runs a model repository:
  - KServe puts the InferenceService's storageUri at /mnt/models (a PVC mounted there, or the
    storage initializer's copy) and starts the runtime's container, the project's serving image
    (scripts/k8s.py IMAGE, built from the Dockerfile), with
    ``python3 -m scripts.kserve --serve-runtime /mnt/models/config/config.properties``;
  - that command (serve_runtime) starts ``torchserve --start --foreground`` with the repository's
    config.properties and TS_SERVICE_ENVELOPE=kserve (protocol v1) from the runtime's env, which
    TorchServe reads because the config sets enable_envvars_config=true; TorchServe listens on
    127.0.0.1:8085 (inference and management) and 0.0.0.0:8082 (metrics);
  - once every model of the config's model_snapshot has a READY worker, it starts the v1 wrapper
    (run_wrapper: a KServe ModelServer from the kserve SDK in the image) on 8080, the pod's only
    declared port, forwarding /v1/models/<name>:predict to TorchServe; it stops both on SIGTERM
    and exits 1 when either exits on its own, so that the container is restarted.
InferenceServices run in KServe's Standard (raw Kubernetes) deployment mode: a Deployment, a
Service and a HorizontalPodAutoscaler per InferenceService, no Knative (see DEPLOYMENT_MODES).
"""
import argparse
import base64
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import requests
import yaml

from scripts.catalog import ROOT, MODEL_STORE, Catalog, ModelEntry, load_catalog, models_property
from scripts.ts_server import TorchServe, check_java, free_port

# ---------------------------------------------------------------------------------------------

# Facts of the runtime (see the docstring) and of KServe.
MOUNT = "/mnt/models"          # where KServe puts the storageUri in the runtime's container
CONFIG_PATH = f"{MOUNT}/config/config.properties"
HTTP_PORT = 8080               # the wrapper (v1 protocol): the pod's port, behind the predictor Service
TORCHSERVE_PORT = 8085         # TorchServe's inference and management, 127.0.0.1 only
METRICS_PORT = 8082            # TorchServe's Prometheus metrics
GRPC_PORTS = (7070, 7071)      # TorchServe's own gRPC (inference, management), 127.0.0.1 only
ENVELOPES = {"v1": "kserve", "v2": "kservev2"}   # TS_SERVICE_ENVELOPE per protocolVersion
# KServe merges the InferenceService's model spec into the runtime container of this name and
# mounts the storage there.
CONTAINER = "kserve-container"
RUNTIME_COMMAND = ["python3", "-m", "scripts.kserve"]
RUNTIME_API = "serving.kserve.io/v1alpha1"
SERVICE_API = "serving.kserve.io/v1beta1"
TMP_VOLUME, LOG_VOLUME = "torchserve-tmp", "torchserve-logs"

# KServe's deployment modes without Knative. kserve/kserve#4608 renamed RawDeployment to Standard
# (legacy values are still recognized by the controller: pkg/constants ParseDeploymentMode). But
# the admission webhook (pkg/apis/serving/v1beta1/inference_service_validation.go,
# validateAutoScalingCompExtension) switches on the annotation's literal value: only "Standard"
# (with serving.kserve.io/autoscalerClass: hpa) reaches the HPA checks that accept scaleMetric
# cpu/memory; any other value, the legacy "RawDeployment" included, is checked as Knative's
# autoscaler and "[cpu] is not a supported metric" refuses the InferenceService. Releases before
# the rename switch on "RawDeployment" instead, and know no "Standard" mode (0.15: kserve#4701):
# choose the value of the cluster's KServe in the catalog (deploy.deployment_mode).
DEPLOYMENT_MODES = ("Standard", "RawDeployment")
AUTOSCALER_CLASS = "hpa"
# Raw deployment scales with a HorizontalPodAutoscaler: scaleMetric cpu or memory (kserve's
# AutoscalerAllowedHPAMetricsList); concurrency and rps need Knative's autoscaler (KServe docs,
# "Autoscaling with Kubernetes HPA"; the SDK's V1beta1PredictorSpec.scale_metric).
HPA_METRICS = ("cpu", "memory")

DRAIN = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
SERVE_START_TIMEOUT_S = 600.0  # serve_runtime: TorchServe's workers READY within this (SERVE_START_TIMEOUT)

BENCH_PATH = os.path.join(ROOT, "build", "bench", "latest.json")        # the latest `make bench`
RECORDED_BENCH = os.path.join(ROOT, "docs", "results", "bench.json")    # committed figures
CAPACITY_DOC = os.path.join(ROOT, "docs", "deployment-k8s.md")
CAPACITY_START, CAPACITY_END = "<!-- capacity:start -->", "<!-- capacity:end -->"


class DeployError(ValueError):
    pass


def project_image() -> str:
    """The project's serving image, as scripts/k8s.py names it (one constant for both)."""
    from scripts import k8s  # here, not at the top: scripts.k8s imports this module
    return k8s.IMAGE


def deploy_settings(catalog: Catalog) -> dict:
    deploy = catalog.deploy
    if not deploy:
        raise DeployError("models/catalog.yaml has no deploy: block; see docs/deployment.md 'Deploying on KServe'")
    if deploy.get("deployment_mode") not in DEPLOYMENT_MODES:
        raise DeployError(f"deploy.deployment_mode {deploy.get('deployment_mode')!r}: one of "
                          f"{', '.join(DEPLOYMENT_MODES)} (Standard for KServe releases since the rename)")
    if deploy["protocol"] not in ENVELOPES:
        raise DeployError(f"deploy.protocol {deploy['protocol']!r}: one of {', '.join(ENVELOPES)}")
    if "cpu" in (deploy.get("image") or {}):
        raise DeployError("deploy.image.cpu: the CPU image is the runtime's, the project's serving image "
                          "(scripts/k8s.py IMAGE, or --image); the catalog names only the GPU build")
    return deploy


# ---------------------------------------------------------------------------------------------
# What is served


def served_entries(catalog: Catalog, canary: Optional[Dict[str, str]] = None) -> List[ModelEntry]:
    """One entry per model served at start: its default version, or the canary's version.

    KServe's v1 path /v1/models/<name>:predict has no version: TorchServe answers it with the
    default version, so other versions would hold workers nobody can reach. A new version goes
    out as a canary InferenceService whose repository serves it as the default."""
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
            raise DeployError(f"model {name}: one version per model in a KServe model repository, got {list(versions)}")
        for settings in versions.values():
            settings.update(defaultVersion=True, batchSize=1)
    return models


def runtime_settings(catalog: Catalog) -> dict:
    """The catalog's server settings, with the runtime's addresses and paths (the layout KServe
    gives the container: the repository at MOUNT)."""
    settings = dict(catalog.server)
    settings.update({
        # 127.0.0.1: only the wrapper and the start-up check in the same pod talk to TorchServe,
        # whose APIs run without a key here.
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
# For the project's ClusterServingRuntime (clusterservingruntime.yaml): its container runs
# python3 -m scripts.kserve --serve-runtime with this file from the storageUri at /mnt/models,
# which starts TorchServe with it; the runtime sets TS_SERVICE_ENVELOPE (kserve for protocol v1),
# read through enable_envvars_config. The v1 wrapper serves the pod's port 8080 and forwards
# /v1/models/NAME:predict to TorchServe on 127.0.0.1 port 8085.
# Token authorization is off (disable_token_authorization): the wrapper and the readiness check
# call TorchServe without a key, and kubelet probes cannot carry one. No key file is written.
# TorchServe listens on 127.0.0.1 only, so its management API is unreachable from outside the
# pod; clients and probes reach the wrapper on 8080 (GET /v1/models/NAME says whether NAME is
# ready), and requests are authenticated in front of KServe (ingress, gateway or mesh).
# Metrics (Prometheus text) are on 0.0.0.0 port 8082 for the runtime's scrape annotations.
# batchSize is 1: under the kserve envelope TorchServe must not batch separate requests (it
# would answer only the first of a batch, the rest fail with 503). Send several instances in
# one request to batch them: the handler runs them as one batch.
# Each model serves one version (its default): the v1 path names no version; a new version goes
# out as a canary InferenceService (inferenceservice-canary.yaml).
"""


def render_kserve_config(catalog: Catalog, entries: Sequence[ModelEntry]) -> str:
    """config.properties for the runtime. No comment line holds '=': read_properties (as KServe's
    TorchServe wrappers do) takes every line with '=' as a setting, comments included."""
    lines = [*CONFIG_HEADER.splitlines()]
    for key, value in runtime_settings(catalog).items():
        lines.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    models = kserve_models_property(entries)
    snapshot = {"name": "startup.cfg", "modelCount": len(models), "models": models}
    lines.append("model_snapshot=" + json.dumps(snapshot, separators=(",", ":")))
    bad = [line for line in lines if line.startswith("#") and "=" in line]
    if bad:
        raise DeployError(f"comment lines must not hold '=' (read_properties takes them as settings): {bad[0]}")
    return "\n".join(lines) + "\n"


def read_properties(text: str) -> dict:
    """config.properties as serve_runtime reads it: every line with '=' is a setting."""
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
# The runtime: a ClusterServingRuntime running the project's serving image


def runtime_args(config_path: str = CONFIG_PATH, http_port: int = HTTP_PORT) -> List[str]:
    """The arguments of RUNTIME_COMMAND: serve the repository whose config is ``config_path``,
    the wrapper on ``http_port``. The rehearsal runs the same with its own paths and ports."""
    return ["--serve-runtime", config_path, "--http-port", str(http_port)]


def runtime_env(protocol: str) -> Dict[str, str]:
    """The runtime container's environment. The paths are the two emptyDirs of the runtime (the
    root filesystem is read-only), as in scripts/k8s.py's Deployment."""
    from scripts import k8s
    return {
        "TS_SERVICE_ENVELOPE": ENVELOPES[protocol],   # read through enable_envvars_config
        "TMPDIR": k8s.TMP_DIR,                        # pid file, extracted archives, Java/Python temp
        "TEMP": k8s.TMP_DIR,                          # torchserve hands it to Java as java.io.tmpdir
        "LOG_LOCATION": k8s.LOG_DIR,
        "METRICS_LOCATION": k8s.LOG_DIR,
        "XDG_CACHE_HOME": f"{k8s.TMP_DIR}/.cache",
        "PYTHONDONTWRITEBYTECODE": "1",
        "SERVE_START_TIMEOUT": str(int(SERVE_START_TIMEOUT_S)),
    }


def cluster_serving_runtime(catalog: Catalog, image: Optional[str] = None) -> dict:
    """The project's ClusterServingRuntime: one container (CONTAINER) of the serving image running
    RUNTIME_COMMAND + runtime_args(), the format ``deploy.model_format`` (autoSelect false: only
    InferenceServices that name the runtime get it), protocol v1, non-root with a read-only root
    filesystem, two emptyDirs for what TorchServe writes."""
    from scripts import k8s
    deploy = deploy_settings(catalog)
    image = image or project_image()
    name = deploy["runtime"]
    scrape = {"prometheus.kserve.io/port": str(METRICS_PORT), "prometheus.kserve.io/path": "/metrics",
              "prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT),
              "prometheus.io/path": "/metrics"}
    container = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": list(RUNTIME_COMMAND),
        "args": runtime_args(),
        "env": [{"name": k, "value": v} for k, v in runtime_env(deploy["protocol"]).items()],
        "ports": [{"name": "http1", "containerPort": HTTP_PORT, "protocol": "TCP"}],
        # The InferenceService's resources replace these; they apply to one that names none.
        "resources": json.loads(json.dumps(deploy["cpu"]["resources"])),
        # The wrapper listens only once every model has a READY worker (serve_runtime), so its
        # "/" answering is the pod's readiness; TorchServe exiting ends the container.
        "startupProbe": {"httpGet": {"path": "/", "port": HTTP_PORT}, "periodSeconds": 5, "timeoutSeconds": 3,
                         "failureThreshold": int(SERVE_START_TIMEOUT_S // 5)},
        "readinessProbe": {"httpGet": {"path": "/", "port": HTTP_PORT}, "periodSeconds": 10,
                           "timeoutSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/", "port": HTTP_PORT}, "periodSeconds": 10,
                          "timeoutSeconds": 5, "failureThreshold": 3},
        # Endpoints removed and requests in flight finished before the SIGTERM (serve_runtime
        # stops the wrapper, then TorchServe); the InferenceService's grace period covers it.
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", f"sleep {k8s.DRAIN_SLEEP_S}"]}}},
        "securityContext": {"runAsNonRoot": True, "runAsUser": k8s.RUN_AS, "runAsGroup": k8s.RUN_AS,
                            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]},
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "volumeMounts": [{"name": TMP_VOLUME, "mountPath": k8s.TMP_DIR},
                         {"name": LOG_VOLUME, "mountPath": k8s.LOG_DIR}],
    }
    return {"apiVersion": RUNTIME_API, "kind": "ClusterServingRuntime",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": deploy["name"],
                                                  "app.kubernetes.io/version": image.rsplit(":", 1)[-1],
                                                  "app.kubernetes.io/managed-by": "scripts.kserve"}},
            "spec": {"annotations": scrape,
                     "supportedModelFormats": [{"name": deploy["model_format"], "autoSelect": False}],
                     "protocolVersions": [deploy["protocol"]],
                     "multiModel": False,
                     "containers": [container],
                     "volumes": [{"name": TMP_VOLUME, "emptyDir": {"sizeLimit": k8s.TMP_SIZE}},
                                 {"name": LOG_VOLUME, "emptyDir": {"sizeLimit": k8s.LOG_SIZE}}]}}


# ---------------------------------------------------------------------------------------------
# InferenceService manifests


def inference_service(name: str, storage_uri: str, profile: dict, timeout_s: int, deploy: dict,
                      image: Optional[str] = None, grace_s: Optional[int] = None) -> dict:
    """An InferenceService serving the model repository at ``storage_uri`` on the project's
    runtime, in deploy.deployment_mode (Standard: Deployment + Service + HPA, no Knative).
    ``profile`` holds resources, replicas and the HPA's metric; ``image`` replaces the runtime's
    image (the GPU build), ``grace_s`` is the pods' termination grace period."""
    predictor = {
        "minReplicas": profile["min_replicas"],
        "maxReplicas": profile["max_replicas"],
        "scaleMetric": profile["scale_metric"],
        "scaleTarget": profile["scale_target"],
        "timeout": timeout_s,
        # Standard mode only (the Knative validator refuses it): a new pod before an old one goes.
        "deploymentStrategy": json.loads(json.dumps(DRAIN)),
    }
    if grace_s is not None:
        predictor["terminationGracePeriodSeconds"] = grace_s
    model = {
        "modelFormat": {"name": deploy["model_format"]},
        "protocolVersion": deploy["protocol"],
        "runtime": deploy["runtime"],
        "storageUri": storage_uri,
        "resources": json.loads(json.dumps(profile["resources"])),
    }
    if image:
        model["image"] = image
    predictor["model"] = model
    return {"apiVersion": SERVICE_API, "kind": "InferenceService",
            "metadata": {"name": name,
                         "annotations": {"serving.kserve.io/deploymentMode": deploy["deployment_mode"],
                                         "serving.kserve.io/autoscalerClass": AUTOSCALER_CLASS},
                         "labels": {"app.kubernetes.io/part-of": deploy["name"],
                                    "app.kubernetes.io/managed-by": "scripts.kserve"}},
            "spec": {"predictor": predictor}}


def request_timeout_s(entries: Sequence[ModelEntry]) -> int:
    """The predictor's request timeout: the longest responseTimeout of the served models."""
    return max(m.serving["responseTimeout"] for m in entries)


def grace_period_s(entries: Sequence[ModelEntry]) -> int:
    """preStop sleep + the longest responseTimeout + a margin (as scripts/k8s.py's pods)."""
    from scripts import k8s
    return k8s.DRAIN_SLEEP_S + request_timeout_s(entries) + k8s.STOP_MARGIN_S


def canary_storage_uri(storage_uri: str) -> str:
    return storage_uri.rstrip("/") + "-canary"


def canary_name(deploy: dict) -> str:
    return f"{deploy['name']}-canary"


def services(catalog: Catalog, storage_uri: str, canary: Optional[Dict[str, str]] = None) -> Dict[str, dict]:
    """kind (cpu, gpu, and canary when ``canary`` names versions) -> InferenceService. The canary
    is a second InferenceService, not a revision: canaryTrafficPercent splits traffic between
    Knative revisions only ("Canary rollout strategy is only supported in serverless deployment
    mode", KServe docs, Canary Rollout Strategy), and the Standard mode has none. It serves
    canary_storage_uri() with the CPU profile at deploy.canary_replicas fixed replicas."""
    deploy = deploy_settings(catalog)
    entries = served_entries(catalog)
    out = {}
    for kind in ("cpu", "gpu"):
        out[kind] = inference_service(deploy["name"], storage_uri, deploy[kind], request_timeout_s(entries),
                                      deploy, image=(deploy.get("image") or {}).get(kind),
                                      grace_s=grace_period_s(entries))
    if canary:
        canary_entries = served_entries(catalog, canary)
        replicas = deploy["canary_replicas"]
        profile = {**deploy["cpu"], "min_replicas": replicas, "max_replicas": replicas}
        out["canary"] = inference_service(canary_name(deploy), canary_storage_uri(storage_uri), profile,
                                          request_timeout_s(canary_entries), deploy,
                                          grace_s=grace_period_s(canary_entries))
    return out


# The SDK's model names that are neither kserve's nor the kubernetes client's classes, and the
# kubernetes client's model of the same Kubernetes type (checked like the others, not free-form).
SDK_ALIASES = {
    "K8sIoApiAppsV1DeploymentStrategy": "V1DeploymentStrategy",
    "K8sIoApiAutoscalingV2HorizontalPodAutoscalerBehavior": "V2HorizontalPodAutoscalerBehavior",
}


def _sdk_class(type_name: str):
    import kubernetes.client.models
    import kserve.models
    type_name = SDK_ALIASES.get(type_name, type_name)
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


SDK_TYPES = {("InferenceService", SERVICE_API): "V1beta1InferenceService",
             ("ClusterServingRuntime", RUNTIME_API): "V1alpha1ClusterServingRuntime"}


def _service_rules(manifest: dict) -> List[str]:
    """What KServe's Standard mode and the project's runtime need of an InferenceService, beyond
    the SDK's schema (see DEPLOYMENT_MODES and HPA_METRICS for where each rule comes from)."""
    problems = []
    annotations = (manifest.get("metadata") or {}).get("annotations") or {}
    mode = annotations.get("serving.kserve.io/deploymentMode")
    if mode not in DEPLOYMENT_MODES:
        problems.append(f"metadata.annotations serving.kserve.io/deploymentMode is {mode!r}, not one of "
                        f"{', '.join(DEPLOYMENT_MODES)}: without it KServe's default mode applies")
    if annotations.get("serving.kserve.io/autoscalerClass") != AUTOSCALER_CLASS:
        problems.append(f"metadata.annotations serving.kserve.io/autoscalerClass must be {AUTOSCALER_CLASS!r} "
                        "(the HPA checks of KServe's admission webhook, and an HPA)")
    predictor = (manifest.get("spec") or {}).get("predictor") or {}
    if "canaryTrafficPercent" in predictor:
        problems.append("spec.predictor.canaryTrafficPercent needs Knative (Serverless) mode; the Standard mode "
                        "has no revisions to split: deploy the canary as its own InferenceService")
    for key in ("containerConcurrency",):
        if key in predictor:
            problems.append(f"spec.predictor.{key} is a Knative setting; the Standard mode ignores it")
    metric = predictor.get("scaleMetric", "cpu")
    if metric not in HPA_METRICS:
        problems.append(f"spec.predictor.scaleMetric {metric!r}: the Standard mode scales with an HPA on "
                        f"{' or '.join(HPA_METRICS)}; concurrency and rps need Knative's autoscaler")
    target = predictor.get("scaleTarget")
    if metric == "cpu" and target is not None and not 1 <= target <= 100:
        problems.append(f"spec.predictor.scaleTarget {target}: a CPU utilization target is 1..100 (%)")
    low, high = predictor.get("minReplicas", 1), predictor.get("maxReplicas", 0)
    if low < 1:
        problems.append(f"spec.predictor.minReplicas {low}: the Standard mode does not scale to zero")
    if high < low:
        problems.append(f"spec.predictor.maxReplicas {high} is below minReplicas {low}")
    model = predictor.get("model") or {}
    if not model.get("runtime"):
        problems.append("spec.predictor.model.runtime is missing: name the project's runtime")
    if not model.get("storageUri"):
        problems.append("spec.predictor.model.storageUri is missing: the runtime serves the repository there")
    return problems


def _runtime_rules(manifest: dict) -> List[str]:
    problems = []
    spec = manifest.get("spec") or {}
    containers = spec.get("containers") or []
    if [c.get("name") for c in containers][:1] != [CONTAINER]:
        problems.append(f"spec.containers[0] must be named {CONTAINER!r}: KServe merges the model spec into it "
                        "and mounts the storage there")
    from scripts.k8s import container_security_problems  # here: scripts.k8s imports this module
    for i, container in enumerate(containers):
        where = f"spec.containers[{i}] ({container.get('name')})"
        problems += container_security_problems(container, where)
        if not container.get("readinessProbe"):
            problems.append(f"{where}: readinessProbe is missing")
    formats = spec.get("supportedModelFormats") or []
    if not formats:
        problems.append("spec.supportedModelFormats is empty: no InferenceService could name the runtime")
    for i, model_format in enumerate(formats):
        if model_format.get("autoSelect") is not False:
            problems.append(f"spec.supportedModelFormats[{i}].autoSelect must be false: only InferenceServices "
                            "that name the runtime get it")
    if not spec.get("protocolVersions"):
        problems.append("spec.protocolVersions is empty")
    return problems


def check_manifest(manifest: dict):
    """The manifest (an InferenceService or a ClusterServingRuntime) as the kserve SDK's model of
    its kind (V1beta1InferenceService, V1alpha1ClusterServingRuntime): every field must be one the
    SDK's models have, with a value of its type, and come back unchanged from the SDK's
    serializer; then the rules above. Returns the SDK object; raises DeployError."""
    from kserve.api_client import ApiClient
    if not isinstance(manifest, dict):
        raise DeployError(f"a manifest must be a mapping, got {type(manifest).__name__}")
    key = (manifest.get("kind"), manifest.get("apiVersion"))
    if key not in SDK_TYPES:
        raise DeployError(f"kind {key[0]!r} in apiVersion {key[1]!r}: expected one of "
                          + ", ".join(f"{kind} {api}" for kind, api in SDK_TYPES))
    obj = to_sdk_model(manifest, SDK_TYPES[key])
    lost = lost_in_round_trip(manifest, ApiClient().sanitize_for_serialization(obj))
    if lost:
        raise DeployError(f"the KServe SDK does not give the manifest back unchanged: {'; '.join(lost)}")
    problems = (_service_rules if key[0] == "InferenceService" else _runtime_rules)(manifest)
    if problems:
        raise DeployError(f"{key[0]} {(manifest.get('metadata') or {}).get('name')}: " + "; ".join(problems))
    return obj


def check_runtime_serves(runtime: dict, service: dict) -> None:
    """What KServe checks when an InferenceService names a runtime (the predictor reconciler:
    "Specified runtime does not support specified framework/version" / "protocol version"): the
    name, a supported model format, a supported protocol."""
    model = service["spec"]["predictor"]["model"]
    where = f"InferenceService {service['metadata']['name']}"
    if model.get("runtime") != runtime["metadata"]["name"]:
        raise DeployError(f"{where} names the runtime {model.get('runtime')!r}, not {runtime['metadata']['name']!r}")
    formats = [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    if model["modelFormat"]["name"] not in formats:
        raise DeployError(f"{where}: model format {model['modelFormat']['name']!r} is not one the runtime "
                          f"supports ({', '.join(formats)})")
    if model.get("protocolVersion", "v1") not in runtime["spec"]["protocolVersions"]:
        raise DeployError(f"{where}: protocol {model.get('protocolVersion')!r} is not one the runtime speaks "
                          f"({', '.join(runtime['spec']['protocolVersions'])})")


class _Dumper(yaml.SafeDumper):
    """No anchors and aliases (&id001 / *id001): every manifest spelled out."""

    def ignore_aliases(self, data):
        return True


MANIFEST_HEADER = """\
# Generated by `python -m scripts.kserve` from models/catalog.yaml. Do not edit by hand.
# Checked against the kserve SDK's {type} model when written.
"""


def write_manifest(path: str, manifest: dict, note: str = "") -> None:
    check_manifest(manifest)
    with open(path, "w", encoding="utf-8") as f:
        f.write(MANIFEST_HEADER.format(type=SDK_TYPES[(manifest["kind"], manifest["apiVersion"])])
                + "".join(f"# {line}\n" for line in note.splitlines()))
        yaml.dump(manifest, f, Dumper=_Dumper, sort_keys=False)


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


def load_bench(path: str = RECORDED_BENCH) -> dict:
    if not os.path.exists(path):
        hint = "run `make bench` first" if os.path.abspath(path) == BENCH_PATH else \
            "record one with `python -m scripts.kserve --record-bench build/bench/latest.json`"
        raise DeployError(f"{os.path.relpath(path, ROOT)} is missing: {hint}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def served_throughputs(bench: dict, entries: Sequence[ModelEntry]) -> Dict[str, float]:
    """Model name -> measured served items/s of the archive it is served with (served models the
    benchmark did not measure, or whose row failed, are left out)."""
    out = {}
    archives = {m.mar_name: m.name for m in entries}
    for rows in (bench.get("archive_variants") or {}).values():
        for row in rows:
            served = row.get("served") or {}
            throughput = served.get("throughput_items_s") or served.get("throughput_img_s")
            if row.get("archive") in archives and throughput and not served.get("failure"):
                out[archives[row["archive"]]] = float(throughput)
    return out


# The header fields of a `make bench` result that the capacity sheet names, and the figures of
# each served row it is made from (scripts/bench.py: Measurement.summary).
BENCH_HEADER = ("started", "machine", "cpu_count", "concurrency", "seconds", "torch", "families")
SERVED_FIGURES = ("unit", "throughput_items_s", "p50_ms", "p99_ms", "items_ok", "measured_s", "errors",
                  "foreign_cpu_cores", "failure")


def recorded_figures(bench: dict, source: str) -> dict:
    """The figures of a `make bench` result that the capacity sheet needs, in the same layout
    (a recorded file can be recorded again): header, and per archive its served row."""
    variants = {}
    for model, rows in (bench.get("archive_variants") or {}).items():
        kept = [{"archive": row["archive"], "variant": row.get("variant"),
                 "served": {k: row["served"][k] for k in SERVED_FIGURES if k in row["served"]}}
                for row in rows if row.get("served")]
        if kept:
            variants[model] = kept
    if not variants:
        raise DeployError(f"{source} holds no served rows (archive_variants): not a `make bench` result?")
    return {"recorded_from": bench.get("recorded_from", source),
            **{k: bench[k] for k in BENCH_HEADER if k in bench}, "archive_variants": variants}


def record_bench(source: str, catalog: Catalog, dest: str = RECORDED_BENCH,
                 doc: str = CAPACITY_DOC) -> dict:
    """Copies the figures of ``source`` to ``dest`` and rewrites the capacity sheet of ``doc``
    from them. Refused when no model served at start has a served figure."""
    bench = load_bench(source)
    figures = recorded_figures(bench, os.path.relpath(os.path.abspath(source), ROOT))
    deploy = deploy_settings(catalog)
    entries = served_entries(catalog)
    block = capacity_markdown(figures, entries, deploy["capacity_rates"], deploy["headroom"])
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(dest, "w", encoding="utf-8") as f:
        json.dump(figures, f, indent=2)
        f.write("\n")
    write_capacity_doc(block, doc)
    return figures


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
        f"concurrency {bench.get('concurrency', '?')}, {bench.get('seconds', '?')} s per row, one item "
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


def capacity_block(catalog: Catalog, bench_path: str = RECORDED_BENCH) -> str:
    """The capacity sheet as the committed document holds it: from the recorded figures."""
    deploy = deploy_settings(catalog)
    return capacity_markdown(load_bench(bench_path), served_entries(catalog), deploy["capacity_rates"],
                             deploy["headroom"])


def committed_capacity_block(doc: str = CAPACITY_DOC) -> str:
    """What ``doc`` holds between CAPACITY_START and CAPACITY_END (the lines between them)."""
    with open(doc, encoding="utf-8") as f:
        text = f.read()
    if text.count(CAPACITY_START) != 1 or text.count(CAPACITY_END) != 1:
        raise DeployError(f"{os.path.relpath(doc, ROOT)} needs one {CAPACITY_START} and one {CAPACITY_END} line")
    return text.split(CAPACITY_START + "\n", 1)[1].split(CAPACITY_END, 1)[0]


def write_capacity_doc(block: str, doc: str = CAPACITY_DOC) -> None:
    """Replaces what ``doc`` holds between the markers with ``block``; the rest is kept."""
    committed_capacity_block(doc)  # the markers are there, once each
    with open(doc, encoding="utf-8") as f:
        text = f.read()
    before, rest = text.split(CAPACITY_START + "\n", 1)
    after = rest.split(CAPACITY_END, 1)[1]
    with open(doc, "w", encoding="utf-8") as f:
        f.write(before + CAPACITY_START + "\n" + block + CAPACITY_END + after)


# ---------------------------------------------------------------------------------------------
# In the runtime's container: TorchServe from the repository, then the v1 wrapper in front of it


def _say(message: str) -> None:
    print(f"kserve-runtime: {message}", file=sys.stderr, flush=True)


def snapshot_models(props: dict) -> List[str]:
    """Names of the models the config's model_snapshot loads at start (one version each: the
    repository's; TorchServe describes it as the model's default, GET /models/<name>)."""
    if "model_snapshot" not in props:
        raise DeployError("the config has no model_snapshot: not written by `python -m scripts.kserve`")
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
    from scripts.ts_client import TorchServeClient
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
                [sys.executable, "-c", "from scripts.kserve import run_wrapper; run_wrapper()", host,
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
        self.command = [sys.executable, "-m", "scripts.kserve", *runtime_args(config_path, self.http_port)]
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


# ---------------------------------------------------------------------------------------------


def write_deployment(out: str, catalog: Catalog, storage_uri: str, deploy: Optional[dict] = None,
                     canary: Optional[Dict[str, str]] = None, model_store: str = MODEL_STORE,
                     log=print, image: Optional[str] = None, bench_path: str = RECORDED_BENCH) -> dict:
    """Writes the runtime, the layout and the InferenceServices under ``out``; returns what was
    written, by role. ``deploy`` (default: the catalog's) replaces the catalog's deploy block."""
    if deploy is not None:
        catalog = Catalog(server=catalog.server, models=catalog.models, deploy=deploy)
    deploy = deploy_settings(catalog)
    if deploy["protocol"] != "v1":  # the handlers take v1 instances; v2 tensors are not mapped
        raise DeployError(f"protocol {deploy['protocol']!r}: only v1 is supported (and rehearsed)")
    os.makedirs(out, exist_ok=True)
    written = {}
    runtime = cluster_serving_runtime(catalog, image)
    path = written["runtime"] = os.path.join(out, "clusterservingruntime.yaml")
    write_manifest(path, runtime, f"The project's runtime: {runtime['spec']['containers'][0]['image']} running "
                   f"{' '.join(RUNTIME_COMMAND + runtime_args())}.\nCluster-scoped: apply it once "
                   "(cluster admin); InferenceServices name it in spec.predictor.model.runtime.")
    log(f"wrote {os.path.relpath(path, ROOT)} ({runtime['metadata']['name']})")
    entries = served_entries(catalog)
    repo = os.path.join(out, "model-repo")
    written["config"] = write_model_repo(repo, catalog, entries, model_store)
    log(f"wrote {os.path.relpath(repo, ROOT)}/: config/config.properties and model-store/ "
        f"({', '.join(f'{m.name} {m.version}' for m in entries)})")
    if canary:
        canary_entries = served_entries(catalog, canary)
        written["canary_config"] = write_model_repo(os.path.join(out, "model-repo-canary"), catalog,
                                                    canary_entries, model_store)
    manifests = services(catalog, storage_uri, canary)
    notes = {"cpu": f"CPU replicas ({deploy['deployment_mode']} mode: Deployment, Service, HPA on CPU use).",
             "gpu": "GPU replicas, the same repository; alternative to inferenceservice-cpu.yaml (same name).\n"
                    "HPA on CPU use: the Standard mode has no concurrency metric (Knative's).",
             "canary": f"Canary: {', '.join(f'{n} {v}' for n, v in (canary or {}).items())}, as its own "
                       f"InferenceService beside {deploy['name']}\n(Standard mode has no revisions to split "
                       "traffic between): send it a share of the requests in front."}
    for kind, manifest in manifests.items():
        check_runtime_serves(runtime, manifest)
        path = written[kind] = os.path.join(out, f"inferenceservice-{kind}.yaml")
        write_manifest(path, manifest, notes[kind])
        log(f"wrote {os.path.relpath(path, ROOT)}")
    try:
        sheet = capacity_markdown(load_bench(bench_path), entries, deploy["capacity_rates"], deploy["headroom"])
    except DeployError as exc:
        log(f"capacity sheet skipped: {exc}")
    else:
        path = written["capacity"] = os.path.join(out, "capacity.md")
        with open(path, "w", encoding="utf-8") as f:
            f.write(sheet)
        log(f"wrote {os.path.relpath(path, ROOT)} (from {os.path.relpath(bench_path, ROOT)})")
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


def next_steps(out: str, storage_uri: str, deploy: dict, written: dict, image: Optional[str] = None) -> str:
    rel = os.path.relpath(out, ROOT)
    name = deploy["name"]
    image = image or project_image()
    steps = ["", "Next:", f"  # 1. the serving image ({image}: make image, then push) and the runtime (once per cluster)",
             f"  kubectl apply -f {rel}/clusterservingruntime.yaml"]
    steps += ["  # 2. upload the model repository"] + [f"  {c}" for c in upload_commands(f"{rel}/model-repo", storage_uri)]
    steps += ["  # 3. deploy (or inferenceservice-gpu.yaml) and wait",
              f"  kubectl apply -f {rel}/inferenceservice-cpu.yaml",
              f"  kubectl wait --for=condition=Ready inferenceservice/{name} --timeout=15m",
              f"  # 4. call it: the predictor Service {name}-predictor (port 80), here through a port-forward",
              f"  kubectl port-forward service/{name}-predictor 8080:80 &",
              "  echo '{\"instances\": [{\"data\": {\"b64\": \"'$(base64 -w0 build/samples/digit_7_0.png)'\"}}]}' > digits.json",
              '  curl -H "Content-Type: application/json" http://127.0.0.1:8080/v1/models/digits:predict -d @digits.json']
    if "canary" in written:
        steps += [f"  # canary: upload model-repo-canary, apply; it runs beside {name} as {canary_name(deploy)}"]
        steps += [f"  {c}" for c in upload_commands(f"{rel}/model-repo-canary", canary_storage_uri(storage_uri))]
        steps += [f"  kubectl apply -f {rel}/inferenceservice-canary.yaml"]
    if "REGISTRY/" in image + json.dumps(deploy.get("image") or {}):
        steps += ["", "Note: the image names are placeholders (REGISTRY/...): pass --image (and set deploy.image.gpu)."]
    return "\n".join(steps)


def rehearsal_instance(entry: ModelEntry) -> Optional[dict]:
    """One v1 instance for ``entry``: a sample image for an image model, a sentence for a text
    model, a row for a tabular one (None: nothing to send)."""
    family = getattr(entry, "family", "image")
    if family == "text":
        return {"data": "KServe forwards this sentence to TorchServe."}
    if family != "image":
        return None
    sample = os.path.join(ROOT, "build", "samples", "digit_7_0.png" if entry.name == "digits" else "china.jpg")
    if not os.path.exists(sample):
        return None
    with open(sample, "rb") as f:
        return image_instance(f.read())


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "build", "kserve"))
    parser.add_argument("--storage-uri", help="where the model repository will be: pvc://claim/path, "
                        "gs://..., s3://... (default: the catalog's deploy.storage_uri)")
    parser.add_argument("--image", help="the serving image the runtime runs (default: scripts/k8s.py IMAGE)")
    parser.add_argument("--canary-version", help="MODEL=VERSION (or VERSION): also write a canary "
                        "repository and InferenceService serving that version")
    parser.add_argument("--bench", default=RECORDED_BENCH,
                        help="bench figures for <out>/capacity.md (default: the recorded docs/results/bench.json)")
    parser.add_argument("--rehearse", action="store_true",
                        help="then run the runtime's command locally on the layout and send v1 requests")
    parser.add_argument("--record-bench", metavar="BENCH_JSON",
                        help="only copy the figures of a `make bench` result to docs/results/bench.json and "
                             "rewrite the capacity sheet of docs/deployment-k8s.md from them")
    parser.add_argument("--serve-runtime", metavar="CONFIG",
                        help="only serve the repository of CONFIG as the runtime's container does")
    parser.add_argument("--http-port", type=int, default=HTTP_PORT, help="with --serve-runtime: the wrapper's port")
    args = parser.parse_args(argv)
    if args.serve_runtime:
        try:
            return serve_runtime(args.serve_runtime, args.http_port)
        except (DeployError, OSError) as exc:
            _say(f"error: {exc}")
            return 1
    try:
        catalog = load_catalog()
        if args.record_bench:
            record_bench(args.record_bench, catalog, RECORDED_BENCH, CAPACITY_DOC)
            print(f"recorded {os.path.relpath(args.record_bench, ROOT)} in {os.path.relpath(RECORDED_BENCH, ROOT)}; "
                  f"capacity sheet rewritten in {os.path.relpath(CAPACITY_DOC, ROOT)}")
            return 0
        deploy = deploy_settings(catalog)
        storage_uri = args.storage_uri or deploy["storage_uri"]
        out = os.path.abspath(args.out)
        written = write_deployment(out, catalog, storage_uri, canary=parse_canary(args.canary_version, catalog),
                                   image=args.image, bench_path=os.path.abspath(args.bench))
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(next_steps(out, storage_uri, deploy, written, args.image))
    if args.rehearse:
        return rehearse(os.path.join(out, "model-repo"), os.path.join(out, "rehearsal"), catalog)
    return 0


if __name__ == "__main__":
    sys.exit(main())
