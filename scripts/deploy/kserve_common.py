"""KServe deployment, shared by its modules (scripts/deploy/kserve.py is the command): the facts of the
runtime and of KServe, the deploy settings of the catalog, which models are served, and the
runtime's config.properties settings."""
import os
from typing import Dict, List, Optional, Sequence

from models.catalog import ROOT, Catalog, ModelEntry, models_property
from scripts.deploy.pods import IMAGE, DeployError  # noqa: F401  (DeployError: the kserve modules' error)


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
RUNTIME_COMMAND = ["python3", "-m", "scripts.deploy.kserve"]
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


def project_image() -> str:
    """The project's serving image (scripts/deploy/pods.py: one constant for Kubernetes and KServe)."""
    return IMAGE


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
                          "(scripts/deploy/k8s.py IMAGE, or --image); the catalog names only the GPU build")
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


def read_properties(text: str) -> dict:
    """config.properties as serve_runtime reads it: every line with '=' is a setting."""
    props = {}
    for line in text.splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props
