"""Faults against a real TorchServe: a worker killed under load, a request past responseTimeout,
and a stop with requests in flight followed by a start. Plus the drill's arithmetic on made-up
timelines."""
import json
import os
import shutil
import signal
import threading
import time
import zipfile

import psutil
import pytest
import yaml

from scripts.drills import fault_drill
from scripts.drills.fault_drill import Answer, WorkerSnapshot

RESPONSE_TIMEOUT_S = 5
WORKER_DIED = "Worker died."  # TorchServe's message for a request whose worker went away

integration = pytest.mark.integration


def copy_archive_with_model_config(src: str, dst: str, **changes) -> str:
    """The archive at ``src`` with top-level keys of its model-config.yaml changed. The archive's
    responseTimeout wins over the one given at registration, so this is how to shorten it."""
    with zipfile.ZipFile(src) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    config = yaml.safe_load(entries["model-config.yaml"])
    config.update(changes)
    entries["model-config.yaml"] = yaml.safe_dump(config, sort_keys=False).encode()
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return dst


def wait_for_replacement(client, model: str, old_pid: int, timeout_s: float = 300.0) -> int:
    """The pid of a READY worker of ``model`` other than ``old_pid``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for worker in client.describe(model)[0]["workers"]:
            if worker["status"] == "READY" and worker["pid"] != old_pid:
                return worker["pid"]
        time.sleep(0.5)
    raise TimeoutError(f"no replacement worker for {model} after {timeout_s:.0f} s")


@pytest.fixture(scope="module")
def store(catalog, model_store, tmp_path_factory) -> str:
    """digits' archive, and a copy of it whose responseTimeout is RESPONSE_TIMEOUT_S."""
    folder = tmp_path_factory.mktemp("store")
    digits = shutil.copy(os.path.join(model_store, catalog.model("digits").mar_name), folder)
    copy_archive_with_model_config(digits, str(folder / "digits_timeout.mar"),
                                   responseTimeout=RESPONSE_TIMEOUT_S)
    return str(folder)


@pytest.fixture(scope="module")
def server(catalog, store, torchserve_factory):
    with torchserve_factory.start("ts", catalog=catalog, store=store) as ts:
        yield ts


@pytest.fixture
def digit_png(samples) -> bytes:
    _, _, images, _ = samples.digits_split()
    return samples.png_bytes(images[0])


# -- the drill's arithmetic --------------------------------------------------------------------
def steady(start: float, end: float, per_s: float, status=200) -> list:
    step = 1.0 / per_s
    return [Answer(start + i * step, start + (i + 1) * step, status)
            for i in range(int((end - start) * per_s))]


def test_recovery_is_the_first_window_after_the_kill_back_at_90_percent():
    finished = [a.finished for a in steady(13, 40, 100)]  # nothing answered for 3 s after the kill
    assert fault_drill.recovery_seconds(finished, 10.0, 100.0, window_s=2.0) == pytest.approx(3.01)
    undisturbed = [a.finished for a in steady(10, 40, 100)]
    assert fault_drill.recovery_seconds(undisturbed, 10.0, 100.0, window_s=2.0) == pytest.approx(0.01)
    slow = [a.finished for a in steady(10, 40, 50)]  # never back above half the rate
    assert fault_drill.recovery_seconds(slow, 10.0, 100.0, window_s=2.0) is None


def test_summary_counts_failures_and_finds_the_replacement():
    answers = (steady(0, 10, 10) + [Answer(9.5, 10.2, 507, "Worker died.")] * 3
               + steady(12, 20, 10) + [Answer(15, 15.1, "ConnectionError", "reset")])
    snapshots = [WorkerSnapshot(9.0, {"9000": (100, "READY")}),
                 WorkerSnapshot(10.5, {"9000": (100, "UNLOADING")}),
                 WorkerSnapshot(11.5, {"9000": (200, "READY")})]
    report = fault_drill.summarize(answers, snapshots, model="m", workers=1, batch_size=8,
                                   concurrency=4, measured_from=1.0, killed_at=10.0,
                                   killed_pid=100, killed_worker="9000", old_pids={100})
    assert report.failures == 4 and report.failure_statuses == {"507": 3, "ConnectionError": 1}
    assert report.failure_messages["507"] == "Worker died."
    assert report.replacement_pid == 200 and report.seconds_to_replacement_ready == 1.5
    assert report.rate_before == pytest.approx(10.0, rel=0.05)
    assert report.successes_after_recovery > 0 and report.failures_after_recovery == 1


# -- a worker killed under load ----------------------------------------------------------------
@integration
def test_killed_worker_is_replaced_and_only_its_batch_fails(server, catalog, tmp_path):
    entry = catalog.model("digits")
    try:
        report = fault_drill.run_drill(server, entry, workers=2, concurrency=8, warmup_s=2.0,
                                       before_s=6.0, after_s=180.0, tail_s=3.0)
    finally:
        server.client.unregister(entry.name)
    print(fault_drill.format_report(report))
    fault_drill.write_report(report, str(tmp_path / "drill.json"))
    assert json.loads((tmp_path / "drill.json").read_text())["killed_pid"] == report.killed_pid
    assert report.answers_before > 0
    assert report.replacement_pid not in (None, report.killed_pid)  # TorchServe restarted it
    assert report.failures <= report.failure_bound  # at most what was in flight
    assert set(report.failure_statuses) <= {"507"}, report.failure_messages
    assert all(WORKER_DIED in m for m in report.failure_messages.values())
    assert report.successes_after_recovery > 0 and report.failures_after_recovery == 0


# -- a request past responseTimeout ------------------------------------------------------------
@integration
def test_request_past_response_timeout_fails_alone_and_the_worker_is_replaced(server, digit_png):
    """The worker is frozen (SIGSTOP) while it holds a request, so that the request exceeds
    responseTimeout whatever the machine's speed (as a batch of huge images would on a slow one)."""
    client = server.client
    client.register("digits_timeout.mar", model_name="digits_timeout", synchronous="true")
    stuck_pid = None
    try:
        description = client.describe("digits_timeout")[0]
        assert description["responseTimeout"] == RESPONSE_TIMEOUT_S
        stuck_pid = description["workers"][0]["pid"]
        os.kill(stuck_pid, signal.SIGSTOP)
        answers = {}

        def send(name):
            answers[name] = client.predict_raw("digits_timeout", digit_png, timeout=600)

        first = threading.Thread(target=send, args=("in flight",))
        first.start()
        time.sleep(1.0)  # the first request is on the frozen worker; the next one waits in the queue
        queued = threading.Thread(target=send, args=("queued",))
        queued.start()
        first.join()
        queued.join()
        assert answers["in flight"].status_code == 500
        assert answers["in flight"].json() == {"code": 500, "type": "InternalServerException",
                                               "message": WORKER_DIED}
        assert answers["queued"].status_code == 200, answers["queued"].text
        assert answers["queued"].json()[0]["label"] == "7"
        new_pid = wait_for_replacement(client, "digits_timeout", stuck_pid)
        assert not psutil.pid_exists(stuck_pid) or psutil.Process(stuck_pid).status() == psutil.STATUS_ZOMBIE
        later = [client.predict_raw("digits_timeout", digit_png) for _ in range(3)]
        assert [r.status_code for r in later] == [200, 200, 200]
        assert client.describe("digits_timeout")[0]["workers"][0]["pid"] == new_pid
    finally:
        if stuck_pid and psutil.pid_exists(stuck_pid):
            os.kill(stuck_pid, signal.SIGKILL)
        client.unregister("digits_timeout")


# -- stop with requests in flight, start again -------------------------------------------------
SERVED_FIELDS = ("modelUrl", "minWorkers", "maxWorkers", "batchSize", "maxBatchDelay",
                 "responseTimeout", "loadedAtStartup")


def served_models(client) -> dict:
    """name -> its default version and, per version, what describe says (and its READY workers)."""
    out = {}
    for name in sorted({m["modelName"] for m in client.list_models()}):
        versions = {}
        for description in client.describe(name, "all"):
            versions[description["modelVersion"]] = {
                **{k: description[k] for k in SERVED_FIELDS},
                "ready": sum(w["status"] == "READY" for w in description["workers"])}
        out[name] = {"default": client.describe(name)[0]["modelVersion"], "versions": versions}
    return out


class Load:
    """Clients posting back to back until stopped; keeps (status or exception name) per answer."""

    def __init__(self, client, model: str, body: bytes, threads: int = 3):
        self.outcomes, self._stop = [], threading.Event()
        self._threads = [threading.Thread(target=self._post, args=(client, model, body), daemon=True)
                         for _ in range(threads)]

    def _post(self, client, model, body):
        while not self._stop.is_set():
            try:
                self.outcomes.append(client.predict_raw(model, body, timeout=120).status_code)
            except Exception as exc:  # noqa: BLE001  a refused or reset connection is an outcome
                self.outcomes.append(type(exc).__name__)

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join(180)


@integration
def test_stop_with_requests_in_flight_and_start_again_serves_the_same_models(
        catalog, model_store, torchserve_factory, digit_png):
    """config.properties (load_models + models=) is what comes back; a model registered at run
    time through the management API does not (servers start with --ncs: no snapshot is read)."""
    expected_names = sorted({m.name for m in catalog.loaded_at_start})
    with torchserve_factory.start("ts-restarted", catalog=catalog, store=model_store, load_models=True,
                                  allowed_urls="", wait_for=expected_names, ready_timeout=600) as ts:
        before = served_models(ts.client)
        assert sorted(before) == expected_names
        for entry in catalog.loaded_at_start:
            served = before[entry.name]["versions"][entry.version]
            assert served["loadedAtStartup"] and served["modelUrl"] == entry.mar_name
            assert served["batchSize"] == entry.serving["batchSize"]
            assert served["ready"] == entry.serving["minWorkers"]
        for name in expected_names:
            assert before[name]["default"] == catalog.model(name).version  # the catalog's default
        ts.client.register(catalog.model("digits_int8").mar_name, model_name="registered_at_run_time",
                           synchronous="true")
        with Load(ts.client, "digits", digit_png) as load:
            while load.outcomes.count(200) < 10:
                time.sleep(0.2)
            answered_before_stop = len(load.outcomes)
            ts.stop()
        print("outcomes during the stop:", sorted(set(map(str, load.outcomes[answered_before_stop:]))))
        assert set(load.outcomes[:answered_before_stop]) == {200}

        ts.start()
        ts.client.wait_ready(expected_names, 600)
        after = served_models(ts.client)
        assert after == before  # same models, default versions, settings and workers
        assert "registered_at_run_time" not in after
        assert ts.client.predict("digits", digit_png)[0]["label"] == "7"
