"""The version workflow against a real TorchServe of its own: register a new version of digits
while traffic flows, switch the default, roll back, with no request failing; scale, unregister,
the management CLI's errors, the A/B comparison, and the start-up default-version fix."""
import json
import subprocess
import sys
import threading
import time

import pytest

from scripts.serving import ab_compare, manage
from models.catalog import ROOT
from scripts.serving.ts_client import TorchServeError
from tests.answers import answers_close

TRAFFIC_THREADS = 3
REQUESTS_PER_PHASE = 20   # answered requests wanted inside each phase before moving on


@pytest.fixture(scope="module")
def v2_archive(catalog):
    return catalog.model("digits", "2.0").mar_name


@pytest.fixture(scope="module")
def server(catalog, model_store, torchserve_factory):
    with torchserve_factory.start("ts-versions", models=[catalog.model("digits", "1.0")], catalog=catalog,
                                  store=model_store) as ts:
        yield ts


@pytest.fixture
def history(tmp_path):
    return str(tmp_path / manage.HISTORY_FILE)


@pytest.fixture(scope="module")
def digit_pngs(samples):
    _, _, images, _ = samples.digits_split()
    return [samples.png_bytes(p) for p in images[:40]]


def only_version_1(client):
    """digits 1.0 registered alone and default, whatever an earlier test left."""
    client._json("management", "PUT", "/models/digits/1.0/set-default")
    if "2.0" in manage.registered_versions(client, "digits"):
        client.unregister("digits", "2.0")


def both_versions(client, v2_archive, default="1.0"):
    if "2.0" not in manage.registered_versions(client, "digits"):
        manage.register(client, v2_archive)
    client._json("management", "PUT", f"/models/digits/{default}/set-default")


VERSION_HEADER = "X-Model-Version"


def answered(client, png, version=None):
    """(answer, the version that gave it: the handler's X-Model-Version header)."""
    response = client.predict_raw("digits", png, version, content_type="image/png")
    assert response.status_code == 200, response.text
    return response.json(), response.headers.get(VERSION_HEADER)


class Traffic:
    """Client threads posting digit PNGs to /predictions/digits until stopped; each answer is
    recorded with the phase (a counter the test advances) in which it was sent and received,
    and the version that answered it (X-Model-Version)."""

    def __init__(self, client, pngs):
        self.client, self.pngs = client, pngs
        self.phase = 0
        self.records = []  # (phase sent, phase received, image index, status, body, version)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True)
                         for k in range(TRAFFIC_THREADS)]

    def _run(self, k):
        i = k
        while not self._stop.is_set():
            index, sent = i % len(self.pngs), self.phase
            try:
                response = self.client.predict_raw("digits", self.pngs[index], content_type="image/png")
                status, body = response.status_code, response.json() if response.ok else response.text
                version = response.headers.get(VERSION_HEADER)
            except Exception as exc:  # a failed request is a result here, not a crash
                status, body, version = 0, repr(exc), None
            with self._lock:
                self.records.append((sent, self.phase, index, status, body, version))
            i += TRAFFIC_THREADS

    def inside(self, phase):
        with self._lock:
            return [r for r in self.records if r[0] == r[1] == phase]

    def next_phase(self):
        with self._lock:
            self.phase += 1

    def wait_for(self, count, timeout_s=300.0):
        """Until ``count`` requests were sent and answered inside the current phase."""
        deadline = time.monotonic() + timeout_s
        while len(self.inside(self.phase)) < count:
            assert time.monotonic() < deadline, f"no traffic in phase {self.phase}"
            time.sleep(0.05)

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)


@pytest.mark.integration
def test_new_version_switch_and_rollback_under_traffic(server, v2_archive, digit_pngs, history):
    client = server.client
    only_version_1(client)
    v1 = [answered(client, png, "1.0")[0] for png in digit_pngs]
    with Traffic(client, digit_pngs) as traffic:
        traffic.wait_for(REQUESTS_PER_PHASE)                      # phase 0: 1.0 alone
        traffic.next_phase()                                      # phase 1: registering 2.0
        manage.register(client, v2_archive)
        registering = traffic.phase
        traffic.next_phase()                                      # phase 2: both, 1.0 default
        traffic.wait_for(REQUESTS_PER_PHASE)
        v2 = [answered(client, png, "2.0")[0] for png in digit_pngs]
        traffic.next_phase()                                      # phase 3: switching
        assert manage.set_default(client, "digits", "2.0", history) == "1.0"
        traffic.next_phase()                                      # phase 4: 2.0 default
        traffic.wait_for(REQUESTS_PER_PHASE)
        assert manage.default_version(client, "digits") == "2.0"
        default_answers = [answered(client, png) for png in digit_pngs]
        traffic.next_phase()                                      # phase 5: rolling back
        assert manage.rollback(client, "digits", history) == ("2.0", "1.0")
        traffic.next_phase()                                      # phase 6: 1.0 default again
        traffic.wait_for(REQUESTS_PER_PHASE)
        assert manage.default_version(client, "digits") == "1.0"
        rolled_back_answers = [answered(client, png) for png in digit_pngs]

    # The versions differ far beyond kernel rounding on most images (tests/answers.py), so the
    # answers themselves also tell them apart; the header says which version answered.
    assert sum(not answers_close(a, b) for a, b in zip(v1, v2)) >= len(digit_pngs) // 2
    by_version = {"1.0": v1, "2.0": v2}
    for expected_version, answers in (("2.0", default_answers), ("1.0", rolled_back_answers)):
        for index, (body, version) in enumerate(answers):
            assert version == expected_version, f"image {index}: answered by {version}"
            assert answers_close(body, by_version[version][index]), f"image {index}: {body}"
    failed = [r for r in traffic.records if r[3] != 200]
    assert not failed, f"{len(failed)} of {len(traffic.records)} requests failed: {failed[:3]}"
    assert traffic.inside(registering), "no request was answered while 2.0 was registering"
    expected = {0: "1.0", 1: "1.0", 2: "1.0", 4: "2.0", 6: "1.0"}  # 3 and 5 may be answered by either
    for sent, received, index, _, body, version in traffic.records:
        if sent == received and sent in expected:
            assert version == expected[sent], f"phase {sent}: image {index}: answered by {version}"
        assert version in by_version, f"phase {sent}: image {index}: version header {version!r}"
        assert answers_close(body, by_version[version][index]), \
            f"phase {sent}: image {index}: not version {version}'s answer: {body}"
    assert manage.read_history(history) == {"digits": []}


@pytest.mark.integration
def test_rollback_without_history_says_so(server, v2_archive, history):
    both_versions(server.client, v2_archive)
    with pytest.raises(manage.ManageError, match="no earlier default version of digits"):
        manage.rollback(server.client, "digits", history)
    assert manage.default_version(server.client, "digits") == "1.0"


def run_cli(server, *args):
    command = [sys.executable, "-m", "scripts.serving.manage", "--inference-url", server.inference_url,
               "--management-url", server.management_url, "--home", server.cwd, *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_cli_lists_sets_default_rolls_back_and_reports_errors_plainly(server, v2_archive):
    both_versions(server.client, v2_archive)
    listing = run_cli(server, "list")
    assert listing.returncode == 0, listing.stderr
    rows = [line.split() for line in listing.stdout.splitlines()[1:]]
    assert [(r[0], r[1], r[2] == "*") for r in rows] == [("digits", "1.0", True),
                                                          ("digits", "2.0", False)]

    switched = run_cli(server, "set-default", "digits", "2.0")
    assert switched.returncode == 0 and "1.0 -> 2.0" in switched.stdout
    rolled_back = run_cli(server, "rollback", "digits")
    assert rolled_back.returncode == 0 and "2.0 -> 1.0" in rolled_back.stdout
    assert manage.default_version(server.client, "digits") == "1.0"

    missing = run_cli(server, "set-default", "digits", "9.9")
    assert missing.returncode == 1
    assert "404" in missing.stderr
    assert "Model version 9.9 does not exist for model digits" in missing.stderr
    nothing_left = run_cli(server, "rollback", "digits")
    assert nothing_left.returncode == 1 and "no earlier default version" in nothing_left.stderr
    for result in (missing, nothing_left):
        assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_scale_up_and_down_changes_the_worker_count(server, v2_archive):
    both_versions(server.client, v2_archive)
    client = server.client
    manage.scale(client, "digits", 2, version="2.0")
    assert manage.worker_states(client.describe("digits", "2.0")[0]) == ["READY", "READY"]
    assert len(client.describe("digits", "1.0")[0]["workers"]) == 1  # the other version untouched
    manage.scale(client, "digits", 1, version="2.0")
    assert manage.worker_states(client.describe("digits", "2.0")[0]) == ["READY"]


@pytest.mark.integration
def test_ab_compare_reports_accuracy_and_agreement(server, v2_archive, tmp_path):
    both_versions(server.client, v2_archive)
    out = tmp_path / "ab.json"
    code = ab_compare.main(["digits/1.0", "digits/2.0", "--inputs", "digits", "--concurrency", "4",
                            "--json", str(out), "--inference-url", server.inference_url,
                            "--management-url", server.management_url, "--home", server.cwd])
    assert code == 0
    result = json.loads(out.read_text())
    heldout = len(ab_compare.digits_inputs())
    for name in ("digits/1.0", "digits/2.0"):
        target = result["per_target"][name]
        assert target["requests"] == result["distinct_inputs"] == heldout and target["errors"] == 0
        assert target["accuracy"] >= 0.95
    agreement = result["agreement"]
    assert agreement["kind"] == "topk" and agreement["compared"] == heldout
    assert agreement["top1_agreement"] >= 0.9
    assert agreement["identical"] < 1  # two different models answered


@pytest.mark.integration
def test_enforce_default_versions_fixes_the_wrong_default(server, catalog, v2_archive):
    both_versions(server.client, v2_archive, default="2.0")  # as when TorchServe loaded 2.0 first
    client = server.client
    client.register(catalog.model("digits").mar_name, model_name="digits_single",
                    initial_workers=0, synchronous="true")
    try:
        # the catalog's (1.0 for digits; its variants are not registered here), and a model with
        # a single version, which is left alone whatever its configured default
        defaults = {**catalog.default_versions(), "digits_single": "9.9"}
        assert manage.enforce_default_versions(client, defaults) == {"digits": ("2.0", "1.0")}
        assert manage.default_version(client, "digits") == "1.0"
        assert manage.enforce_default_versions(client, defaults) == {}
        with pytest.raises(manage.ManageError, match="configured default version 3.0 of digits"):
            manage.enforce_default_versions(client, {"digits": "3.0"})
    finally:
        client.unregister("digits_single")


@pytest.mark.integration
def test_unregister_a_version(server, v2_archive):
    both_versions(server.client, v2_archive)
    client = server.client
    with pytest.raises(TorchServeError, match="Cannot remove default version"):
        manage.unregister(client, "digits", "1.0")
    manage.unregister(client, "digits", "2.0")
    assert manage.registered_versions(client, "digits") == ["1.0"]
    assert client.predict_raw("digits", b"x", "2.0").status_code == 404


# -- the plain functions, without a server ----------------------------------------------------
def test_agreement_and_quality_by_kind_of_answer():
    def topk(*classes):
        return [{"label": label, "index": int(label), "probability": p} for label, p in classes]

    seven, seven_less_sure = topk(("7", 0.9), ("1", 0.1)), topk(("7", 0.6), ("1", 0.4))
    one = topk(("1", 0.8), ("7", 0.2))
    classes = ab_compare.agreement([(seven, seven), (seven, seven_less_sure), (seven, one), (one, one)])
    assert classes == {"compared": 4, "kind": "topk", "identical": 0.5, "top1_agreement": 0.75}
    assert ab_compare.quality([(seven, "7"), (one, "7")]) == {"accuracy": 0.5}

    embeddings = ab_compare.agreement([({"embeddings": [[1, 0], [0, 2]]},
                                        {"embeddings": [[3, 0], [2, 0]]})])
    assert embeddings["kind"] == "embeddings"
    assert (embeddings["mean_cosine"], embeddings["min_cosine"]) == pytest.approx((0.5, 0.0))

    a, b = {"predictions": [100.0, 50.0]}, {"predictions": [101.0, 47.0]}
    predictions = ab_compare.agreement([(a, b)])
    assert (predictions["mean_abs_difference"], predictions["max_abs_difference"]) == (2.0, 3.0)
    assert ab_compare.quality([(a, [90.0, 50.0])]) == {"mean_abs_error": 5.0}


def test_targets_and_version_order():
    assert ab_compare.parse_target("digits/2.0") == ab_compare.Target("digits", "2.0")
    assert ab_compare.parse_target("digits") == ab_compare.Target("digits", None)
    versions = ["10.0", "2.0", "1.0", "1.0.1"]
    assert sorted(versions, key=manage.version_order) == ["1.0", "1.0.1", "2.0", "10.0"]


def test_history_file_round_trip(history):
    assert manage.read_history(history) == {}
    manage.write_history(history, {"digits": ["1.0", "2.0"]})
    assert manage.read_history(history) == {"digits": ["1.0", "2.0"]}
