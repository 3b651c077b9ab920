"""KServe manifests: the ClusterServingRuntime running the project's serving image, the
InferenceServices that name it, and their check against the kserve SDK's models."""
import json
from typing import Dict, List, Optional, Sequence

import yaml

from models.catalog import Catalog, ModelEntry
from scripts.deploy import pods
from scripts.deploy.pods import container_security_problems, lost_in_round_trip, to_sdk_model
from scripts.deploy.kserve_common import (AUTOSCALER_CLASS, CONFIG_PATH, CONTAINER, DEPLOYMENT_MODES, DRAIN,
                                   DeployError, ENVELOPES, HPA_METRICS, HTTP_PORT, LOG_VOLUME, METRICS_PORT,
                                   RUNTIME_API, RUNTIME_COMMAND, SERVE_START_TIMEOUT_S, SERVICE_API,
                                   TMP_VOLUME, deploy_settings, project_image, served_entries)


# ---------------------------------------------------------------------------------------------
# The runtime: a ClusterServingRuntime running the project's serving image


def runtime_args(config_path: str = CONFIG_PATH, http_port: int = HTTP_PORT) -> List[str]:
    """The arguments of RUNTIME_COMMAND: serve the repository whose config is ``config_path``,
    the wrapper on ``http_port``. The rehearsal runs the same with its own paths and ports."""
    return ["--serve-runtime", config_path, "--http-port", str(http_port)]


def runtime_env(protocol: str) -> Dict[str, str]:
    """The runtime container's environment. The paths are the two emptyDirs of the runtime (the
    root filesystem is read-only), as in scripts/deploy/k8s.py's Deployment."""
    return {
        "TS_SERVICE_ENVELOPE": ENVELOPES[protocol],   # read through enable_envvars_config
        "TMPDIR": pods.TMP_DIR,                        # pid file, extracted archives, Java/Python temp
        "TEMP": pods.TMP_DIR,                          # torchserve hands it to Java as java.io.tmpdir
        "LOG_LOCATION": pods.LOG_DIR,
        "METRICS_LOCATION": pods.LOG_DIR,
        "XDG_CACHE_HOME": f"{pods.TMP_DIR}/.cache",
        "PYTHONDONTWRITEBYTECODE": "1",
        "SERVE_START_TIMEOUT": str(int(SERVE_START_TIMEOUT_S)),
    }


def cluster_serving_runtime(catalog: Catalog, image: Optional[str] = None) -> dict:
    """The project's ClusterServingRuntime: one container (CONTAINER) of the serving image running
    RUNTIME_COMMAND + runtime_args(), the format ``deploy.model_format`` (autoSelect false: only
    InferenceServices that name the runtime get it), protocol v1, non-root with a read-only root
    filesystem, two emptyDirs for what TorchServe writes."""
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
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", f"sleep {pods.DRAIN_SLEEP_S}"]}}},
        "securityContext": {"runAsNonRoot": True, "runAsUser": pods.RUN_AS, "runAsGroup": pods.RUN_AS,
                            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]},
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "volumeMounts": [{"name": TMP_VOLUME, "mountPath": pods.TMP_DIR},
                         {"name": LOG_VOLUME, "mountPath": pods.LOG_DIR}],
    }
    return {"apiVersion": RUNTIME_API, "kind": "ClusterServingRuntime",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": deploy["name"],
                                                  "app.kubernetes.io/version": image.rsplit(":", 1)[-1],
                                                  "app.kubernetes.io/managed-by": "scripts.deploy.kserve"}},
            "spec": {"annotations": scrape,
                     "supportedModelFormats": [{"name": deploy["model_format"], "autoSelect": False}],
                     "protocolVersions": [deploy["protocol"]],
                     "multiModel": False,
                     "containers": [container],
                     "volumes": [{"name": TMP_VOLUME, "emptyDir": {"sizeLimit": pods.TMP_SIZE}},
                                 {"name": LOG_VOLUME, "emptyDir": {"sizeLimit": pods.LOG_SIZE}}]}}


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
                                    "app.kubernetes.io/managed-by": "scripts.deploy.kserve"}},
            "spec": {"predictor": predictor}}


def request_timeout_s(entries: Sequence[ModelEntry]) -> int:
    """The predictor's request timeout: the longest responseTimeout of the served models."""
    return max(m.serving["responseTimeout"] for m in entries)


def grace_period_s(entries: Sequence[ModelEntry]) -> int:
    """preStop sleep + the longest responseTimeout + a margin (as scripts/deploy/k8s.py's pods)."""
    return pods.DRAIN_SLEEP_S + request_timeout_s(entries) + pods.STOP_MARGIN_S


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
# Generated by `python -m scripts.deploy.kserve` from models/catalog.yaml. Do not edit by hand.
# Checked against the kserve SDK's {type} model when written.
"""


def write_manifest(path: str, manifest: dict, note: str = "") -> None:
    check_manifest(manifest)
    with open(path, "w", encoding="utf-8") as f:
        f.write(MANIFEST_HEADER.format(type=SDK_TYPES[(manifest["kind"], manifest["apiVersion"])])
                + "".join(f"# {line}\n" for line in note.splitlines()))
        yaml.dump(manifest, f, Dumper=_Dumper, sort_keys=False)
