"""What every pod of this project has in common, plain Kubernetes (scripts/deploy/k8s.py) and KServe
(scripts/deploy/kserve*.py) alike: the serving image and its user, the two emptyDirs, the drain
times, the container security rules, the ports, and the check that a generated document comes back
unchanged through the kubernetes client's and KServe SDK's models."""
from typing import Dict, List
from urllib.parse import urlsplit


class DeployError(ValueError):
    """A deployment file cannot be generated or checked: the message says what to change."""


# The kubernetes client pinned by kserve==0.21.0 is 37.x, generated from Kubernetes' release-1.37
# OpenAPI document: client major version N is Kubernetes 1.N (tests/unit/test_k8s.py checks the pair).
KUBERNETES_VERSION = "1.37"

# The serving image: built from the Dockerfile at the repository root (TorchServe 0.12, CPU, the
# archives of model_store/ and this repository); its WORKDIR is the repository's copy, so the
# command below is relative to it. REGISTRY is a placeholder: pass --image to name yours.
IMAGE = "REGISTRY/torchserve-models:0.12.0-cpu"
COMMAND = ["scripts/entrypoint.sh"]
RUN_AS = 1000                      # the image's unprivileged user and group (numeric: runAsNonRoot
                                   # can only verify a numeric user)
LOG_DIR = "/var/log/torchserve"    # emptyDir: TorchServe's logs, metrics logs and shutdown snapshot
TMP_DIR = "/tmp"                   # emptyDir: extracted archives, the pid file, Java and Python temp
TMP_SIZE = "2Gi"                   # room for every archive loaded at start, extracted
LOG_SIZE = "1Gi"


DRAIN_SLEEP_S = 10   # preStop: time for the endpoint removal to reach kube-proxy and the gateway
STOP_MARGIN_S = 10   # after the longest responseTimeout, before the kubelet's SIGKILL


class ManifestError(DeployError):
    pass


# ---------------------------------------------------------------------------------------------
# What the catalog says


def server_ports(server: dict) -> Dict[str, int]:
    """Container ports by name, from the catalog's server addresses."""
    ports = {}
    for name, key in (("inference", "inference_address"), ("management", "management_address"),
                      ("metrics", "metrics_address")):
        port = urlsplit(server[key]).port
        if port is None:
            raise ManifestError(f"server.{key} {server[key]!r} names no port")
        ports[name] = port
    ports["grpc"] = int(server["grpc_inference_port"])
    return ports


def container_security_problems(container: dict, where: str, pod_runs_as_non_root: bool = False) -> List[str]:
    """The container rules every manifest of this project keeps (Deployment and KServe runtime):
    non-root, no privilege escalation, read-only root filesystem, every capability dropped."""
    security = container.get("securityContext") or {}
    problems = []
    if not (security.get("runAsNonRoot") is True or pod_runs_as_non_root):
        problems.append(f"{where}: runAsNonRoot must be true")
    if security.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation must be false")
    if security.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{where}: readOnlyRootFilesystem must be true")
    if "ALL" not in ((security.get("capabilities") or {}).get("drop") or []):
        problems.append(f"{where}: capabilities.drop must hold ALL")
    return problems


# The SDK's model names that are neither kserve's nor the kubernetes client's classes, and the
# kubernetes client's model of the same Kubernetes type (checked like the others, not free-form).
SDK_ALIASES = {
    "K8sIoApiAppsV1DeploymentStrategy": "V1DeploymentStrategy",
    "K8sIoApiAutoscalingV2HorizontalPodAutoscalerBehavior": "V2HorizontalPodAutoscalerBehavior",
}


def _sdk_class(type_name: str):
    import kserve.models
    import kubernetes.client.models
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
