"""Fault drill: SIGKILL one TorchServe worker under steady load and measure what it cost.

Starts its own TorchServe (free 127.0.0.1 ports, its own home under build/faults), registers the
model with its catalog settings (optionally more workers), keeps ``--concurrency`` clients posting
real inputs back to back, kills one worker process with SIGKILL, and reports:
  - answers before and after the kill, and every failed request with its status and message;
  - the bound on failures: only the batch on the killed worker may fail (batch size; the test
    allows batch size x workers);
  - seconds until TorchServe's replacement worker is READY (management API, polled);
  - seconds until throughput is back: the first answer of the first window (starting after the
    kill) whose rate of successful answers is >= 90% of the rate before the kill.

    python -m scripts.drills.fault_drill [--model efficientnet_lite0] [--workers N] [--concurrency 16]
                                  [--before 20] [--after 120] [--out build/faults/latest.json]

The test (tests/integration/test_faults.py) runs ``run_drill`` in a short form on digits.
"""
import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import requests

from models.families import FOUNDATION_MODEL, resolve, samples_of
from models.catalog import MODEL_STORE, ROOT, ModelEntry, load_catalog
from scripts.serving.ts_client import TorchServeClient, TorchServeError
from scripts.serving.ts_server import TorchServe

RESULTS_DIR = os.path.join(ROOT, "build", "faults")
RECOVERED_FRACTION = 0.9
# A throughput window holds this many batches at least: answers come a whole batch at a time, so
# a window holds 10 +- 1 of them at a steady rate, and the 90% test is not decided by where it starts.
BATCHES_PER_WINDOW = 10


@dataclass
class Answer:
    started: float
    finished: float
    status: object          # HTTP status, or the name of the client-side exception
    message: str = ""       # the start of the body of a failed answer


@dataclass
class WorkerSnapshot:
    at: float
    workers: Dict[str, tuple]  # worker id -> (pid, status)


@dataclass
class DrillReport:
    model: str
    workers: int
    batch_size: int
    concurrency: int
    killed_pid: int
    killed_worker: str
    answers_before: int
    answers_after: int
    rate_before: float
    failures: int
    failure_statuses: Dict[str, int]
    failure_messages: Dict[str, str]
    failure_bound: int
    replacement_pid: Optional[int]
    seconds_to_replacement_ready: Optional[float]
    seconds_to_all_workers_ready: Optional[float]
    seconds_to_throughput_recovered: Optional[float]
    window_s: float
    successes_after_recovery: int
    failures_after_recovery: int
    notes: List[str] = field(default_factory=list)


def sample_inputs(entry: ModelEntry) -> List[bytes]:
    """Real inputs for the model: its family's samples (models/families.py), e.g. the
    photographs for an RGB classifier, held-out digits for the grayscale digits model."""
    return list(resolve(samples_of(entry).drill)())


def digit_bodies() -> List[bytes]:
    """16 held-out digits as the 8-bit grayscale PNGs a client sends."""
    from models import sample_data
    _, _, images, _ = sample_data.digits_split()
    return [sample_data.png_bytes(p) for p in images[:16]]


def sentence_bodies() -> List[bytes]:
    """The fidelity gate's real sentences, one UTF-8 text body each."""
    from models import sentences
    return [text.encode("utf-8") for text in sentences.fidelity_sentences()]


def row_bodies() -> List[bytes]:
    """Held-out diabetes rows, each a JSON list of the 10 features (as the bench sends them)."""
    from models.tabular import diabetes_split
    _, _, rows, _, _ = diabetes_split()
    return [json.dumps([float(str(v)) for v in row]).encode("utf-8") for row in rows[:64]]


class SteadyLoad:
    """``concurrency`` threads posting back to back until stopped; every answer is kept."""

    def __init__(self, client: TorchServeClient, model: str, bodies: Sequence[bytes],
                 concurrency: int, timeout_s: float):
        self.client, self.model, self.bodies = client, model, list(bodies)
        self.concurrency, self.timeout_s = concurrency, timeout_s
        self.answers: List[Answer] = []  # list.append is atomic
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []

    def _post_forever(self, index: int) -> None:
        n = index
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                response = self.client.predict_raw(self.model, self.bodies[n % len(self.bodies)],
                                                   timeout=self.timeout_s)
                status = response.status_code
                message = "" if status == 200 else response.text[:300]
            except requests.RequestException as exc:
                status, message = type(exc).__name__, str(exc)[:300]
            self.answers.append(Answer(started, time.monotonic(), status, message))
            n += 1

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._post_forever, args=(i,), daemon=True)
                         for i in range(self.concurrency)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout_s + 10)


class WorkerWatch:
    """Polls the management API's describe call and keeps every (pid, status) of the workers."""

    def __init__(self, client: TorchServeClient, model: str, interval_s: float = 0.2):
        self.client, self.model, self.interval_s = client, model, interval_s
        self.snapshots: List[WorkerSnapshot] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(requests.RequestException, TorchServeError):
                self.snapshots.append(WorkerSnapshot(time.monotonic(),
                                                     worker_states(self.client, self.model)))
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def worker_states(client: TorchServeClient, model: str) -> Dict[str, tuple]:
    """worker id -> (pid, status) as the management API describes them."""
    workers = client.describe(model)[0].get("workers", [])
    return {w["id"]: (w.get("pid"), w.get("status")) for w in workers}


def scale_workers(client: TorchServeClient, model: str, workers: int) -> None:
    client._json("management", "PUT", f"/models/{model}", timeout=600,
                 params={"min_worker": workers, "max_worker": workers, "synchronous": "true"})


def replacement_ready_at(snapshots: Sequence[WorkerSnapshot], old_pids: set, after: float,
                         workers: int) -> tuple:
    """(time a worker with a pid not in ``old_pids`` was first READY, its pid, time all
    ``workers`` were READY again with the killed one replaced), None where it never happened."""
    first, first_pid, all_ready = None, None, None
    for snapshot in snapshots:
        if snapshot.at < after:
            continue
        ready = [pid for pid, status in snapshot.workers.values() if status == "READY"]
        fresh = [pid for pid in ready if pid not in old_pids]
        if fresh and first is None:
            first, first_pid = snapshot.at, fresh[0]
        if fresh and len(ready) >= workers and all_ready is None:
            all_ready = snapshot.at
    return first, first_pid, all_ready


def rate(finished: Sequence[float], start: float, end: float) -> float:
    """Answers per second finished inside [start, end)."""
    if end <= start:
        return 0.0
    return sum(1 for t in finished if start <= t < end) / (end - start)


def recovery_seconds(finished_ok: Sequence[float], killed_at: float, rate_before: float,
                     window_s: float, fraction: float = RECOVERED_FRACTION,
                     step_s: float = 0.1) -> Optional[float]:
    """Seconds from the kill to the first answer of the first ``window_s`` window (starting at or
    after the kill) whose rate of successful answers is >= ``fraction`` x the rate before the
    kill: when answers flow at full rate again. None when no complete window reached it."""
    if rate_before <= 0 or not finished_ok:
        return None
    finished_ok = sorted(finished_ok)
    start = killed_at
    while start + window_s <= finished_ok[-1]:
        if rate(finished_ok, start, start + window_s) >= fraction * rate_before:
            first = next(t for t in finished_ok if t >= start)
            return first - killed_at
        start += step_s
    return None


def window_seconds(rate_before: float, batch_size: int, least_s: float = 2.0) -> float:
    if rate_before <= 0:
        return least_s
    return max(least_s, BATCHES_PER_WINDOW * batch_size / rate_before)


def summarize(answers: Sequence[Answer], snapshots: Sequence[WorkerSnapshot], *, model: str,
              workers: int, batch_size: int, concurrency: int, measured_from: float,
              killed_at: float, killed_pid: int, killed_worker: str, old_pids: set) -> DrillReport:
    """The drill's figures from the raw answers and worker snapshots (a plain function: the
    unit tests feed it made-up timelines)."""
    before = [a for a in answers if measured_from <= a.finished < killed_at]
    after = [a for a in answers if a.finished >= killed_at]
    failed = [a for a in answers if a.status != 200 and a.finished >= measured_from]
    rate_before = sum(1 for a in before if a.status == 200) / max(1e-9, killed_at - measured_from)
    window_s = window_seconds(rate_before, batch_size)
    ok_after = [a.finished for a in after if a.status == 200]
    recovered = recovery_seconds(ok_after, killed_at, rate_before, window_s)
    ready_at, new_pid, all_ready_at = replacement_ready_at(snapshots, old_pids, killed_at, workers)
    statuses = Counter(str(a.status) for a in failed)
    messages = {}
    for a in failed:
        messages.setdefault(str(a.status), a.message)
    # "Later requests succeed": everything sent once the replacement was READY.
    later = [a for a in answers if ready_at is not None and a.started >= ready_at]
    notes = []
    if any(a.finished < measured_from and a.status != 200 for a in answers):
        notes.append("some requests failed during the warm-up, before the measured window")
    return DrillReport(
        model=model, workers=workers, batch_size=batch_size, concurrency=concurrency,
        killed_pid=killed_pid, killed_worker=killed_worker, answers_before=len(before),
        answers_after=len(after), rate_before=round(rate_before, 2), failures=len(failed),
        failure_statuses=dict(statuses), failure_messages=messages,
        failure_bound=batch_size * workers, replacement_pid=new_pid,
        seconds_to_replacement_ready=None if ready_at is None else round(ready_at - killed_at, 2),
        seconds_to_all_workers_ready=None if all_ready_at is None else round(all_ready_at - killed_at, 2),
        seconds_to_throughput_recovered=None if recovered is None else round(recovered, 2),
        window_s=round(window_s, 2),
        successes_after_recovery=sum(1 for a in later if a.status == 200),
        failures_after_recovery=sum(1 for a in later if a.status != 200), notes=notes)


def run_drill(server: TorchServe, entry: ModelEntry, *, workers: Optional[int] = None,
              concurrency: int = 16, warmup_s: float = 3.0, before_s: float = 20.0,
              after_s: float = 120.0, tail_s: float = 5.0, progress=print) -> DrillReport:
    """Register ``entry`` on a started ``server``, load it, kill one worker, and measure.

    The load runs until the throughput has recovered and then ``tail_s`` more (so that requests
    sent after the recovery are seen), or ``after_s`` after the kill at most."""
    client = server.client
    client.register(entry.mar_name, synchronous="true", **entry.registration())
    workers = workers or entry.serving["minWorkers"]
    if workers != len(worker_states(client, entry.name)):
        scale_workers(client, entry.name, workers)
    client.wait_ready([entry.name], 300)
    batch_size = client.describe(entry.name)[0]["batchSize"]
    timeout_s = entry.serving["responseTimeout"] + 120.0
    load = SteadyLoad(client, entry.name, sample_inputs(entry), concurrency, timeout_s)
    watch = WorkerWatch(client, entry.name)
    progress(f"[drill] {entry.name}: {workers} worker(s), batch {batch_size}, {concurrency} "
             f"clients; warm-up {warmup_s:g} s, {before_s:g} s before the kill")
    load.start()
    watch.start()
    try:
        time.sleep(warmup_s)
        measured_from = time.monotonic()
        time.sleep(before_s)
        states = worker_states(client, entry.name)
        old_pids = {pid for pid, _ in states.values()}
        victim_id, (victim_pid, _) = sorted(states.items())[0]
        killed_at = time.monotonic()
        os.kill(int(victim_pid), signal.SIGKILL)
        progress(f"[drill] SIGKILL worker {victim_id} (pid {victim_pid})")
        deadline = killed_at + after_s
        recovered_at = None
        while time.monotonic() < deadline:
            time.sleep(0.5)
            if recovered_at is None:
                report = summarize(load.answers, watch.snapshots, model=entry.name, workers=workers,
                                   batch_size=batch_size, concurrency=concurrency,
                                   measured_from=measured_from, killed_at=killed_at,
                                   killed_pid=int(victim_pid), killed_worker=victim_id,
                                   old_pids=old_pids)
                if (report.seconds_to_throughput_recovered is not None
                        and report.seconds_to_replacement_ready is not None):
                    recovered_at = time.monotonic()
            elif time.monotonic() >= recovered_at + tail_s:
                break
    finally:
        load.stop()
        watch.stop()
    return summarize(load.answers, watch.snapshots, model=entry.name, workers=workers,
                     batch_size=batch_size, concurrency=concurrency, measured_from=measured_from,
                     killed_at=killed_at, killed_pid=int(victim_pid), killed_worker=victim_id,
                     old_pids=old_pids)


def format_report(report: DrillReport) -> str:
    lines = [
        f"model {report.model}: {report.workers} worker(s), batch size {report.batch_size}, "
        f"{report.concurrency} clients",
        f"killed worker {report.killed_worker} (pid {report.killed_pid}) with SIGKILL",
        f"answers: {report.answers_before} in the measured window before the kill "
        f"({report.rate_before:.1f}/s), {report.answers_after} after",
        f"failed requests: {report.failures} (bound: batch size x workers = {report.failure_bound})"
        + (f"; statuses {report.failure_statuses}" if report.failures else ""),
    ]
    for status, message in report.failure_messages.items():
        lines.append(f"  {status}: {' '.join(message.split())[:200]}")
    lines += [
        f"replacement worker (pid {report.replacement_pid}) READY after "
        f"{report.seconds_to_replacement_ready} s; all workers READY after "
        f"{report.seconds_to_all_workers_ready} s",
        f"throughput back to >= {RECOVERED_FRACTION:.0%} of before: "
        f"{report.seconds_to_throughput_recovered} s after the kill ({report.window_s} s windows)",
        f"after the replacement was READY: {report.successes_after_recovery} answered, "
        f"{report.failures_after_recovery} failed",
    ]
    return "\n".join(lines + report.notes)


def write_report(report: DrillReport, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(asdict(report), f, indent=2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=FOUNDATION_MODEL, help=f"a catalog model (default {FOUNDATION_MODEL})")
    parser.add_argument("--workers", type=int, help="default: the catalog's minWorkers")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--before", type=float, default=20.0, help="seconds measured before the kill")
    parser.add_argument("--after", type=float, default=120.0, help="seconds after the kill, at most")
    parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "latest.json"))
    args = parser.parse_args(argv)
    entry = load_catalog().model(args.model)
    server = TorchServe.from_catalog(os.path.join(RESULTS_DIR, "ts-home"), load_catalog(), MODEL_STORE)
    server.start()
    try:
        report = run_drill(server, entry, workers=args.workers, concurrency=args.concurrency,
                           warmup_s=args.warmup, before_s=args.before, after_s=args.after)
    except Exception:
        print(server.log_tail(), file=sys.stderr)
        raise
    finally:
        server.stop()
    print(format_report(report))
    write_report(report, args.out)
    print(f"written to {os.path.relpath(args.out, ROOT)}")
    bounded = report.failures <= report.failure_bound and report.replacement_pid is not None
    return 0 if bounded and report.failures_after_recovery == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
