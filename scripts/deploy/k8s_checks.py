"""The checks every generated Kubernetes manifest passes before it is written (scripts/deploy/k8s.py):
its apiVersion serves its kind in Kubernetes KUBERNETES_VERSION, it comes back unchanged through the
kubernetes client's models, and the project's rules hold (scripts/deploy/k8s.py's docstring)."""
import re
from typing import List, Optional, Sequence

from models.catalog import Catalog, load_catalog
from scripts.deploy.pods import (KUBERNETES_VERSION, DeployError, ManifestError, container_security_problems,
                                 lost_in_round_trip, server_ports, to_sdk_model)


def _snake(kind: str) -> str:
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", kind)).lower()


def _api_prefix(group: str) -> str:
    """API group -> the client's API class prefix: "" -> Core, networking.k8s.io -> Networking."""
    if not group:
        return "Core"
    return "".join(part.capitalize() for part in re.sub(r"\.k8s\.io$", "", group).split("."))


def served_versions(group: str) -> List[str]:
    import kubernetes.client
    prefix = _api_prefix(group)
    pattern = re.compile(rf"^{prefix}(V\d+(?:(?:alpha|beta)\d+)?)Api$")
    return sorted(m.group(1).lower() for m in map(pattern.match, dir(kubernetes.client)) if m)


def model_type(api_version: str, kind: str) -> str:
    """The kubernetes client's model of ``kind`` in ``api_version``, when Kubernetes
    KUBERNETES_VERSION serves that kind in that group version; ManifestError otherwise."""
    import kubernetes.client
    import kubernetes.client.models
    group, _, version = api_version.rpartition("/")
    if not re.fullmatch(r"v\d+((alpha|beta)\d+)?", version):
        raise ManifestError(f"apiVersion {api_version!r} is not a Kubernetes group/version")
    api = getattr(kubernetes.client, f"{_api_prefix(group)}{version.capitalize()}Api", None)
    if api is None:
        served = served_versions(group)
        raise ManifestError(f"apiVersion {api_version} is not served by Kubernetes {KUBERNETES_VERSION}"
                            f" ({group or 'core'}: {', '.join(served) if served else 'no such API group'})")
    snake = _snake(kind)
    if not any(hasattr(api, f"read_{scope}{snake}") for scope in ("namespaced_", "")):
        raise ManifestError(f"kind {kind!r} is not served in {api_version} by Kubernetes {KUBERNETES_VERSION}")
    type_name = f"{version.capitalize()}{kind}"
    if not hasattr(kubernetes.client.models, type_name):
        raise ManifestError(f"the kubernetes client has no model {type_name} for {kind} {api_version}")
    return type_name


def _one_line(message: str) -> str:
    """pydantic's multi-line validation messages on one line, without the link lines."""
    lines = [line.strip() for line in message.splitlines()
             if line.strip() and not line.strip().startswith("For further information")]
    return "; ".join(lines)


def _port_matches(value, number: int, name: str) -> bool:
    return value == number or value == name


def _policy(doc: dict, catalog: Catalog) -> List[str]:
    """The project's rules the API schema does not state."""
    kind, spec = doc["kind"], doc.get("spec") or {}
    ports = server_ports(catalog.server)
    management = ports["management"]
    problems = []
    wanted = ("app.kubernetes.io/name", "app.kubernetes.io/part-of", "app.kubernetes.io/version")
    missing_labels = [k for k in wanted if k not in (doc["metadata"].get("labels") or {})]
    if missing_labels:
        problems.append(f"metadata.labels lacks {', '.join(missing_labels)}")
    if kind == "Deployment":
        selector = (spec.get("selector") or {}).get("matchLabels") or {}
        template_labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
        if not selector:
            problems.append("spec.selector.matchLabels is empty: the Deployment would select no pods of its own")
        elif any(template_labels.get(k) != v for k, v in selector.items()):
            problems.append("spec.selector does not match the pod template's labels")
        pod = (spec.get("template") or {}).get("spec") or {}
        pod_security = pod.get("securityContext") or {}
        for i, container in enumerate(pod.get("containers") or []):
            where = f"containers[{i}] ({container.get('name')})"
            problems += container_security_problems(container, where, pod_security.get("runAsNonRoot") is True)
            for probe in ("readinessProbe", "livenessProbe"):
                if not container.get(probe):
                    problems.append(f"{where}: {probe} is missing")
            resources = container.get("resources") or {}
            for part in ("requests", "limits"):
                if not resources.get(part):
                    problems.append(f"{where}: resources.{part} is missing")
    elif kind == "Service":
        if not spec.get("selector"):
            problems.append("spec.selector is missing: the Service would route to no pods")
        if spec.get("type", "ClusterIP") != "ClusterIP":
            problems.append(f"spec.type {spec['type']}: only ClusterIP (the gateway is the way in)")
        for i, port in enumerate(spec.get("ports") or []):
            if (_port_matches(port.get("port"), management, "management")
                    or _port_matches(port.get("targetPort"), management, "management")):
                problems.append(f"spec.ports[{i}] exposes the management port {management}")
    elif kind == "NetworkPolicy":
        if not (spec.get("podSelector") or {}).get("matchLabels"):
            problems.append("spec.podSelector selects every pod of the namespace")
        if "Ingress" not in (spec.get("policyTypes") or []):
            problems.append("spec.policyTypes must hold Ingress")
        for i, rule in enumerate(spec.get("ingress") or []):
            if not rule.get("ports"):
                problems.append(f"spec.ingress[{i}] names no ports: it opens every port, "
                                f"the management port {management} included")
            if not rule.get("from"):
                problems.append(f"spec.ingress[{i}] names no peers: it admits every source")
            for j, port in enumerate(rule.get("ports") or []):
                value, end = port.get("port"), port.get("endPort")
                in_range = isinstance(value, int) and isinstance(end, int) and value <= management <= end
                if value is None or in_range or _port_matches(value, management, "management"):
                    problems.append(f"spec.ingress[{i}].ports[{j}] opens the management port {management}")
    elif kind == "HorizontalPodAutoscaler":
        if spec.get("minReplicas", 1) > spec.get("maxReplicas", 0):
            problems.append("spec.minReplicas exceeds spec.maxReplicas")
        if (spec.get("scaleTargetRef") or {}).get("kind") != "Deployment":
            problems.append("spec.scaleTargetRef must name the Deployment")
    elif kind == "PodDisruptionBudget":
        if ("minAvailable" in spec) == ("maxUnavailable" in spec):
            problems.append("spec needs exactly one of minAvailable and maxUnavailable")
        if not (spec.get("selector") or {}).get("matchLabels"):
            problems.append("spec.selector is missing: the budget would cover no pods")
    return problems


def check_manifest(doc: dict, catalog: Optional[Catalog] = None):
    """``doc`` as the kubernetes client's model of its kind (V1Deployment, V1Service,
    V2HorizontalPodAutoscaler, V1PodDisruptionBudget, V1NetworkPolicy...): the apiVersion must
    serve the kind in Kubernetes KUBERNETES_VERSION, every field must be one the model has, with
    a value of its type, required fields present, and the document must come back unchanged from
    the client's serializer; then the project's rules. Returns the client's object; raises
    ManifestError naming the manifest and the problem."""
    from kubernetes.client import ApiClient
    if not isinstance(doc, dict):
        raise ManifestError(f"a manifest must be a mapping, got {type(doc).__name__}")
    missing = [k for k in ("apiVersion", "kind") if not doc.get(k)]
    if missing:
        raise ManifestError(f"manifest {doc.get('kind', '?')}: required field {missing[0]!r} is missing")
    kind, name = doc["kind"], (doc.get("metadata") or {}).get("name")
    if not name:
        raise ManifestError(f"{kind}: required field 'metadata.name' is missing")
    where = f"{kind} {name}"
    type_name = model_type(doc["apiVersion"], kind)
    try:
        obj = to_sdk_model(doc, type_name)
    except DeployError as exc:
        raise ManifestError(f"{where} (Kubernetes {KUBERNETES_VERSION} {type_name}): {_one_line(str(exc))}") from None
    lost = lost_in_round_trip(doc, ApiClient().sanitize_for_serialization(obj))
    if lost:
        raise ManifestError(f"{where}: the kubernetes client's {type_name} does not give it back unchanged: "
                            + "; ".join(lost))
    problems = _policy(doc, catalog or load_catalog())
    if problems:
        raise ManifestError(f"{where}: " + "; ".join(problems))
    return obj


def check_manifests(docs: Sequence[dict], catalog: Optional[Catalog] = None) -> None:
    """check_manifest on each, then what they must agree on: one Deployment, whose pods the
    Service, the budget and the NetworkPolicy select and the autoscaler scales."""
    catalog = catalog or load_catalog()
    for doc in docs:
        check_manifest(doc, catalog)
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    if len(deployments) != 1:
        raise ManifestError(f"expected one Deployment, got {len(deployments)}")
    target = deployments[0]
    pod_labels = target["spec"]["template"]["metadata"]["labels"]
    for doc in docs:
        spec, where = doc["spec"], f"{doc['kind']} {doc['metadata']['name']}"
        selector = {"Service": lambda: spec.get("selector"),
                    "PodDisruptionBudget": lambda: spec["selector"].get("matchLabels"),
                    "NetworkPolicy": lambda: spec["podSelector"].get("matchLabels")}.get(doc["kind"])
        if selector and any(pod_labels.get(k) != v for k, v in (selector() or {}).items()):
            raise ManifestError(f"{where}: its selector does not select the Deployment's pods")
        if doc["kind"] == "HorizontalPodAutoscaler" and spec["scaleTargetRef"]["name"] != target["metadata"]["name"]:
            raise ManifestError(f"{where}: scales {spec['scaleTargetRef']['name']!r}, not the Deployment "
                                f"{target['metadata']['name']!r}")
