"""Plain Kubernetes manifests (scripts/deploy/k8s.py): generated from the catalog, committed under
deploy/k8s/ exactly as generated, each checked against the Kubernetes API schema of the named
version (the kubernetes client's models), with the project's rules; broken manifests are refused
with a message naming the problem. No cluster is needed."""
import copy
import http.server
import json
import os
import subprocess
import sys
import threading
from dataclasses import replace

import kubernetes
import pytest
import yaml

from scripts.deploy import k8s, k8s_checks, pods
from models.catalog import ROOT
from scripts.deploy.k8s import ManifestError

FILES = list(k8s.BUILDERS)
MODELS = {"deployment.yaml": "V1Deployment", "service.yaml": "V1Service",
          "horizontalpodautoscaler.yaml": "V2HorizontalPodAutoscaler",
          "poddisruptionbudget.yaml": "V1PodDisruptionBudget", "networkpolicy.yaml": "V1NetworkPolicy"}


def committed(name: str) -> dict:
    with open(os.path.join(k8s.OUT, name), encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def docs():
    return {name: committed(name) for name in FILES}


def container_of(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


# -- the named Kubernetes version ---------------------------------------------------------------

def test_the_checks_name_the_kubernetes_version_of_the_client():
    major = int(kubernetes.__version__.split(".")[0])
    assert pods.KUBERNETES_VERSION == f"1.{major}"
    report = kubernetes.client.Configuration().to_debug_report()
    assert f"release-{pods.KUBERNETES_VERSION}" in report
    with open(os.path.join(ROOT, "docs", "deployment-k8s.md"), encoding="utf-8") as f:
        assert f"Kubernetes {pods.KUBERNETES_VERSION}" in f.read()


# -- generated, never hand-edited ---------------------------------------------------------------

def test_generation_is_deterministic(catalog):
    assert k8s.rendered(catalog) == k8s.rendered(catalog)


def test_committed_files_are_what_the_tool_writes(catalog, tmp_path):
    assert sorted(n for n in os.listdir(k8s.OUT) if n.endswith((".yaml", ".yml"))) == sorted(FILES)
    assert k8s.stale(k8s.OUT, catalog) == [], "run `python -m scripts.deploy.k8s`"
    assert k8s.main(["--out", str(tmp_path)]) == 0
    for name in FILES:
        with open(os.path.join(k8s.OUT, name), encoding="utf-8") as a, open(tmp_path / name, encoding="utf-8") as b:
            text = a.read()
            assert text == b.read()
            assert text.splitlines()[0] == k8s.HEADER
    assert k8s.main(["--out", k8s.OUT, "--check"]) == 0


def test_check_option_finds_a_hand_edit(catalog, tmp_path, capsys):
    k8s.write(str(tmp_path), catalog)
    path = tmp_path / "horizontalpodautoscaler.yaml"
    path.write_text(path.read_text().replace("maxReplicas: 8", "maxReplicas: 9"))
    (tmp_path / "extra.yaml").write_text("kind: ConfigMap\n")
    assert k8s.main(["--out", str(tmp_path), "--check"]) == 1
    assert "extra.yaml, horizontalpodautoscaler.yaml differ" in capsys.readouterr().err


# -- every manifest passes the checks -----------------------------------------------------------

@pytest.mark.parametrize("name", FILES)
def test_each_manifest_is_a_valid_object_of_its_kind(docs, catalog, name):
    obj = k8s_checks.check_manifest(docs[name], catalog)
    assert type(obj).__name__ == MODELS[name]
    assert obj.metadata.name == catalog.deploy["name"]


def test_the_manifests_agree(docs, catalog):
    k8s_checks.check_manifests(list(docs.values()), catalog)
    labels = {json.dumps(d["metadata"]["labels"], sort_keys=True) for d in docs.values()}
    assert len(labels) == 1
    (common,) = [json.loads(x) for x in labels]
    assert common["app.kubernetes.io/name"] == common["app.kubernetes.io/part-of"] == catalog.deploy["name"]
    assert common["app.kubernetes.io/version"] == pods.IMAGE.rsplit(":", 1)[1]
    assert docs["deployment.yaml"]["spec"]["template"]["metadata"]["labels"] == common


# -- refused, naming the problem ----------------------------------------------------------------

def _container(d):
    return container_of(d)


NEGATIVE = [
    ("misspelled field", "deployment.yaml", lambda d: d["spec"].update(replica=2),
     "V1DeploymentSpec has no field 'replica'"),
    ("misspelled nested field", "deployment.yaml", lambda d: _container(d).update(imagePullPolicyy="Always"),
     r"containers\.0\.imagePullPolicyy; Extra inputs are not permitted"),
    ("removed apiVersion", "horizontalpodautoscaler.yaml", lambda d: d.update(apiVersion="autoscaling/v2beta1"),
     r"apiVersion autoscaling/v2beta1 is not served by Kubernetes 1\.\d+ \(autoscaling: v1, v2\)"),
    ("kind in the wrong group", "deployment.yaml", lambda d: d.update(apiVersion="v1"),
     r"kind 'Deployment' is not served in v1"),
    ("misspelled kind", "service.yaml", lambda d: d.update(kind="Sevice"), "kind 'Sevice' is not served"),
    ("container port as a string", "deployment.yaml",
     lambda d: _container(d)["ports"][0].update(containerPort="8080"),
     r"containers\.0\.ports\.0\.containerPort; Input should be a valid integer"),
    ("annotation not a string", "deployment.yaml",
     lambda d: d["spec"]["template"]["metadata"]["annotations"].update({"prometheus.io/port": 8082}),
     r"annotations\.`prometheus\.io/port`; Input should be a valid string"),
    ("missing Deployment selector", "deployment.yaml", lambda d: d["spec"].pop("selector"),
     r"V1DeploymentSpec; selector; Field required"),
    ("missing container image name", "deployment.yaml", lambda d: _container(d).pop("name"),
     r"containers\.0\.name; Field required"),
    ("missing metadata.name", "service.yaml", lambda d: d["metadata"].pop("name"),
     "required field 'metadata.name' is missing"),
    ("missing Service selector", "service.yaml", lambda d: d["spec"].pop("selector"),
     "spec.selector is missing: the Service would route to no pods"),
    ("Service exposing management", "service.yaml",
     lambda d: d["spec"]["ports"].append({"name": "management", "port": 8081, "targetPort": "management"}),
     r"spec\.ports\[2\] exposes the management port 8081"),
    ("NetworkPolicy opening 8081", "networkpolicy.yaml",
     lambda d: d["spec"]["ingress"][0]["ports"].append({"protocol": "TCP", "port": 8081}),
     r"spec\.ingress\[0\]\.ports\[2\] opens the management port 8081"),
    ("NetworkPolicy opening management by name", "networkpolicy.yaml",
     lambda d: d["spec"]["ingress"][1]["ports"].append({"port": "management"}),
     r"spec\.ingress\[1\]\.ports\[1\] opens the management port 8081"),
    ("NetworkPolicy port range over 8081", "networkpolicy.yaml",
     lambda d: d["spec"]["ingress"][1]["ports"].append({"port": 8000, "endPort": 8090}),
     r"opens the management port 8081"),
    ("NetworkPolicy rule without ports", "networkpolicy.yaml", lambda d: d["spec"]["ingress"][0].pop("ports"),
     r"spec\.ingress\[0\] names no ports: it opens every port, the management port 8081 included"),
    ("NetworkPolicy rule without peers", "networkpolicy.yaml", lambda d: d["spec"]["ingress"][1].pop("from"),
     r"spec\.ingress\[1\] names no peers: it admits every source"),
    ("privilege escalation", "deployment.yaml",
     lambda d: _container(d)["securityContext"].update(allowPrivilegeEscalation=True),
     "allowPrivilegeEscalation must be false"),
    ("writable root filesystem", "deployment.yaml",
     lambda d: _container(d)["securityContext"].pop("readOnlyRootFilesystem"),
     "readOnlyRootFilesystem must be true"),
    ("no readiness probe", "deployment.yaml", lambda d: _container(d).pop("readinessProbe"),
     r"readinessProbe is missing"),
    ("selector not matching the pods", "deployment.yaml",
     lambda d: d["spec"]["selector"]["matchLabels"].update({"app.kubernetes.io/component": "gateway"}),
     "spec.selector does not match the pod template's labels"),
    ("both budget fields", "poddisruptionbudget.yaml", lambda d: d["spec"].update(minAvailable=1),
     "exactly one of minAvailable and maxUnavailable"),
    ("budget field misspelled", "poddisruptionbudget.yaml",
     lambda d: d["spec"].update(maxUnavailble=d["spec"].pop("maxUnavailable")),
     "V1PodDisruptionBudgetSpec has no field 'maxUnavailble'"),
    ("HPA replicas inverted", "horizontalpodautoscaler.yaml", lambda d: d["spec"].update(minReplicas=9),
     "spec.minReplicas exceeds spec.maxReplicas"),
    ("HPA v1 field in v2", "horizontalpodautoscaler.yaml",
     lambda d: d["spec"].update(targetCPUUtilizationPercentage=70),
     "V2HorizontalPodAutoscalerSpec has no field 'targetCPUUtilizationPercentage'"),
]


@pytest.mark.parametrize("what, name, change, message", NEGATIVE, ids=[n[0] for n in NEGATIVE])
def test_a_broken_manifest_is_refused_naming_the_problem(docs, catalog, what, name, change, message):
    doc = copy.deepcopy(docs[name])
    change(doc)
    with pytest.raises(ManifestError, match=message):
        k8s_checks.check_manifest(doc, catalog)


@pytest.mark.parametrize("name, change, message", [
    ("service.yaml", lambda d: d["spec"]["selector"].update({"app.kubernetes.io/name": "other"}),
     "Service torchserve-models: its selector does not select the Deployment's pods"),
    ("networkpolicy.yaml", lambda d: d["spec"]["podSelector"]["matchLabels"].update({"app.kubernetes.io/name": "other"}),
     "NetworkPolicy torchserve-models: its selector does not select"),
    ("horizontalpodautoscaler.yaml", lambda d: d["spec"]["scaleTargetRef"].update(name="other"),
     "scales 'other', not the Deployment 'torchserve-models'"),
])
def test_manifests_that_disagree_are_refused(docs, catalog, name, change, message):
    broken = copy.deepcopy(docs)
    change(broken[name])
    with pytest.raises(ManifestError, match=message):
        k8s_checks.check_manifests(list(broken.values()), catalog)


def test_nothing_is_written_when_a_manifest_is_refused(catalog, tmp_path, monkeypatch):
    monkeypatch.setattr(k8s, "PROMETHEUS_LABELS", {"app.kubernetes.io/name": 7})
    with pytest.raises(ManifestError, match="NetworkPolicy"):
        k8s.write(str(tmp_path), catalog)
    assert os.listdir(tmp_path) == []


# -- what the manifests say equals the catalog --------------------------------------------------

def test_deployment_follows_the_catalog(docs, catalog):
    deployment = docs["deployment.yaml"]
    pod = deployment["spec"]["template"]["spec"]
    container = container_of(deployment)
    ports = pods.server_ports(catalog.server)
    assert ports == {"inference": 8080, "management": 8081, "metrics": 8082, "grpc": 7070}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == ports
    assert container["image"] == pods.IMAGE and container["command"] == ["scripts/entrypoint.sh"]
    assert container["resources"] == catalog.deploy["cpu"]["resources"]
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it
    # probes: liveness and startup on /ping of the inference port; readiness asks the management
    # API, on 127.0.0.1, for every version served at start and its minWorkers
    for probe in ("livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/ping", "port": "inference"}
    command = container["readinessProbe"]["exec"]["command"]
    assert command[:3] == ["python3", "-c", k8s.READINESS_CHECK]
    spec = json.loads(command[3])
    assert spec["management"] == f"http://127.0.0.1:{ports['management']}"
    assert spec["models"] == {name: {v: m.serving["minWorkers"] for v, m in
                                     ((m.version, m) for m in catalog.loaded_at_start if m.name == name)}
                              for name in {m.name for m in catalog.loaded_at_start}}
    assert spec["models"]["digits"] == {"1.0": 1, "2.0": 1}
    # stop: drain, then stop TorchServe; the grace period outlasts the longest responseTimeout
    assert container["lifecycle"]["preStop"]["exec"]["command"] == [
        "/bin/sh", "-c", f"sleep {pods.DRAIN_SLEEP_S}; torchserve --stop --foreground"]
    longest = max(m.serving["responseTimeout"] for m in catalog.models)
    assert longest == 120
    assert pod["terminationGracePeriodSeconds"] == pods.DRAIN_SLEEP_S + longest + pods.STOP_MARGIN_S > longest
    # non-root, read-only root filesystem with writable emptyDirs, nothing to escalate with
    assert container["securityContext"] == {"runAsNonRoot": True, "runAsUser": pods.RUN_AS, "runAsGroup": pods.RUN_AS,
                                            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts == {pods.TMP_DIR: "tmp", pods.LOG_DIR: "logs"}
    assert {v["name"] for v in pod["volumes"] if "emptyDir" in v} == {"tmp", "logs"}
    # in the pod: token authorization and the model API off, management on loopback only
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["TS_DISABLE_TOKEN_AUTHORIZATION"] == "true" and env["TS_ENABLE_MODEL_API"] == "false"
    assert env["TS_MANAGEMENT_ADDRESS"] == f"http://127.0.0.1:{ports['management']}"
    assert env["TS_GRPC_MANAGEMENT_ADDRESS"] == "127.0.0.1"
    assert env["TS_INFERENCE_ADDRESS"] == f"http://0.0.0.0:{ports['inference']}"
    assert env["LOG_LOCATION"] == pods.LOG_DIR and env["TMPDIR"] == pods.TMP_DIR
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(ports["metrics"]),
                           "prometheus.io/path": "/metrics"}


def test_autoscaler_follows_the_catalog(docs, catalog):
    spec = docs["horizontalpodautoscaler.yaml"]["spec"]
    profile = catalog.deploy["cpu"]
    assert (spec["minReplicas"], spec["maxReplicas"]) == (profile["min_replicas"], profile["max_replicas"]) == (1, 8)
    assert spec["metrics"] == [{"type": "Resource", "resource": {
        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": profile["scale_target"]}}}]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": catalog.deploy["name"]}


def test_service_budget_and_network_policy(docs, catalog):
    ports = pods.server_ports(catalog.server)
    service = docs["service.yaml"]["spec"]
    assert service["type"] == "ClusterIP"
    assert {(p["port"], p["targetPort"]) for p in service["ports"]} == {(ports["inference"], "inference"),
                                                                      (ports["grpc"], "grpc")}
    assert docs["poddisruptionbudget.yaml"]["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in docs["poddisruptionbudget.yaml"]["spec"]
    policy = docs["networkpolicy.yaml"]["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    opened = {}
    for rule in policy["ingress"]:
        (peer,) = rule["from"]
        for port in rule["ports"]:
            opened[port["port"]] = peer
    assert set(opened) == {ports["inference"], ports["grpc"], ports["metrics"]}  # never management
    gateway = opened[ports["inference"]]
    assert gateway == opened[ports["grpc"]]
    assert gateway == {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": catalog.deploy["name"],
                                                       "app.kubernetes.io/component": "gateway"}}}
    assert opened[ports["metrics"]] == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": k8s.PROMETHEUS_NAMESPACE}},
        "podSelector": {"matchLabels": k8s.PROMETHEUS_LABELS}}


def test_catalog_changes_reach_the_manifests(catalog):
    deploy = copy.deepcopy(catalog.deploy)
    deploy["cpu"].update(min_replicas=2, max_replicas=5, scale_target=60)
    slow = [replace(m, serving={**m.serving, "responseTimeout": 300}) if m.name == "minilm" else m
            for m in catalog.models]
    changed = replace(catalog, deploy=deploy, models=slow)
    docs = k8s.manifests(changed, image="registry.example/ts:1.2.3")
    k8s_checks.check_manifests(list(docs.values()), changed)
    hpa = docs["horizontalpodautoscaler.yaml"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 5)
    assert hpa["metrics"][0]["resource"]["target"]["averageUtilization"] == 60
    pod = docs["deployment.yaml"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == pods.DRAIN_SLEEP_S + 300 + pods.STOP_MARGIN_S
    assert pod["containers"][0]["image"] == "registry.example/ts:1.2.3"
    assert docs["service.yaml"]["metadata"]["labels"]["app.kubernetes.io/version"] == "1.2.3"
    deploy["cpu"]["scale_metric"] = "concurrency"
    with pytest.raises(ManifestError, match="scale_metric 'concurrency'"):
        k8s.manifests(changed)


# -- the readiness check, run as the kubelet runs it --------------------------------------------

class FakeManagement(http.server.BaseHTTPRequestHandler):
    """TorchServe's describe answer (GET /models/<name>/<version>), as scripts/serving/ts_client.py reads it."""
    statuses = {}

    def do_GET(self):
        parts = self.path.strip("/").split("/")
        key = "/".join(parts[1:3])
        if parts[0] != "models" or key not in self.statuses:
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b'{"code": 404, "type": "ModelNotFoundException"}')
            return
        body = json.dumps([{"modelName": parts[1], "modelVersion": parts[2],
                            "workers": [{"id": "9000", "status": s} for s in self.statuses[key]]}]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def management():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeManagement)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def run_readiness(docs, url):
    command = container_of(docs["deployment.yaml"])["readinessProbe"]["exec"]["command"]
    spec = json.loads(command[3])
    spec["management"] = url
    return subprocess.run([sys.executable, command[1], command[2], json.dumps(spec)],
                          capture_output=True, text=True, timeout=30)


def test_readiness_check_needs_every_served_version_ready(docs, catalog, management):
    url = f"http://127.0.0.1:{management.server_address[1]}"
    all_ready = {f"{m.name}/{m.version}": ["READY"] for m in catalog.loaded_at_start}
    FakeManagement.statuses = all_ready
    result = run_readiness(docs, url)
    assert result.returncode == 0, result.stderr
    FakeManagement.statuses = {**all_ready, "digits/2.0": ["UNLOADING"], "minilm/1.0": []}
    result = run_readiness(docs, url)
    assert result.returncode == 1
    assert "digits 2.0: 0 of 1 workers READY" in result.stderr and "minilm 1.0: 0 of 1" in result.stderr
    FakeManagement.statuses = {k: v for k, v in all_ready.items() if k != "efficientnet_lite0/1.0"}
    result = run_readiness(docs, url)
    assert result.returncode == 1 and "efficientnet_lite0 1.0: HTTP Error 404" in result.stderr
    management.shutdown()
    management.server_close()
    result = run_readiness(docs, url)
    assert result.returncode == 1 and "not ready" in result.stderr
