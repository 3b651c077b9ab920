"""Sustained load with good and bad inputs mixed, across every served model: nothing may be
lost (every good request answered correctly, every bad one refused as its case says), no worker
may restart, and the workers' memory must not grow once warm.

    python -m scripts.drills.soak [--seconds 60] [--concurrency 32] [--warmup 15] [--against running | --start]
                           [--models efficientnet_lite0,digits] [--bad-fraction 0.25] [--skip-cases a/b,c/d]

--against running (default): the server of config.properties (make serve);
--start: a TorchServe of its own from the catalog on free ports, each served model registered with
its catalog settings, stopped at the end.

Before the clock starts every good request and every case reference is sent alone (its answer is
the correct one), then the mix runs for --warmup seconds unmeasured, then the workers' resident
memory is read (psutil on the pids the management API's describe gives), then --seconds of
measured load, then memory again. Each thread picks a model at random, then a bad case with
probability --bad-fraction (cases marked soak=False in scripts/drills/bad_inputs.py are left out: bodies
over max_request_size, extreme aspect ratios), else a good request. Answers are judged as
scripts/drills/bad_inputs.py judges them; anything else is an unexpected error.

Results: a summary on stdout and build/soak/latest.json. Exit status 1 on any unexpected error,
a restarted worker, or memory growth of 10% or more.
"""
import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import psutil

from scripts.drills import bad_inputs
from scripts.drills.bad_inputs import Case, GoodRequest, Outcome
from models.catalog import MODEL_STORE, ROOT, Catalog, load_catalog
from scripts.serving.ts_client import TorchServeClient
from scripts.serving.ts_server import TorchServe

RESULTS_DIR = os.path.join(ROOT, "build", "soak")
MAX_MEMORY_GROWTH = 0.10
MEMORY_SAMPLE_S = 2.0
WARMUP, MEASURED = "warm-up", "measured"


def log(message: str) -> None:
    print(f"[soak] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# what is sent


@dataclass(frozen=True)
class Mix:
    """Per model: the good requests and the bad cases the load picks from."""
    goods: Dict[str, List[GoodRequest]]
    cases: Dict[str, List[Case]]

    @property
    def models(self) -> List[str]:
        return list(self.goods)


def request_mix(models: Sequence[str], catalog: Catalog, skip_cases: Sequence[str] = ()) -> Mix:
    """Good requests and soak-able cases of each model (``skip_cases``: "model/case" labels)."""
    corpus = bad_inputs.cases(models, catalog)
    return Mix(goods={m: bad_inputs.good_requests(m, catalog) for m in models},
               cases={m: [c for c in corpus if c.model == m and c.soak and c.label not in skip_cases]
                      for m in models})


def pick(mix: Mix, rng: random.Random, bad_fraction: float):
    model = rng.choice(mix.models)
    if mix.cases[model] and rng.random() < bad_fraction:
        return rng.choice(mix.cases[model])
    return rng.choice(mix.goods[model])


def correct_answers(client: TorchServeClient, mix: Mix) -> Dict[tuple, object]:
    """(model, body, content type) -> the answer given alone, for every good request and every
    case reference: what the same input must get under load."""
    answers = {}
    wanted = [(g.model, g.body, g.content_type) for goods in mix.goods.values() for g in goods]
    wanted += [(c.model, c.reference, c.reference_content_type)
               for cases in mix.cases.values() for c in cases if c.reference is not None]
    for key in dict.fromkeys(wanted):
        outcome = bad_inputs.send(client, *key)
        if outcome.status != 200:
            raise RuntimeError(f"{key[0]}: a good or reference input was answered {outcome.status} alone: "
                               f"{outcome.message}")
        answers[key] = outcome.answer
    return answers


def verdict(request, outcome: Outcome, answers: Dict[tuple, object]) -> Tuple[str, bool]:
    """(tally key, unexpected?) of one answer: "ok" for a correct good answer, "<model>/<case>
    <status>" for a case refused as expected, "<model>/<name>: <what went wrong>" otherwise."""
    if isinstance(request, GoodRequest):
        problem = bad_inputs.judge_good(request, outcome, answers[(request.model, request.body, request.content_type)])
    else:
        reference = answers.get((request.model, request.reference, request.reference_content_type))
        problem = bad_inputs.judge(request, outcome, reference)
        if problem is None:
            return f"{request.label} {outcome.status}", False
    if problem is None:
        return "ok", False
    if outcome.status is None:
        kind = "no HTTP answer"
    elif outcome.status != (200 if isinstance(request, GoodRequest) else request.status):
        kind = f"HTTP {outcome.status}"
    else:
        kind = "wrong answer"
    return f"{request.model}/{request.name}: {kind}", True


# ---------------------------------------------------------------------------------------------
# measuring


@dataclass
class Tally:
    """Answers of one phase; threads add to it under its lock."""
    counts: Counter = field(default_factory=Counter)
    unexpected: Counter = field(default_factory=Counter)
    examples: Dict[str, str] = field(default_factory=dict)   # first message of each unexpected kind
    latencies_ms: List[float] = field(default_factory=list)
    good_latencies_ms: List[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, key: str, unexpected: bool, good: bool, latency_ms: float, message: str) -> None:
        with self.lock:
            (self.unexpected if unexpected else self.counts)[key] += 1
            if unexpected:
                self.examples.setdefault(key, message)
            self.latencies_ms.append(latency_ms)
            if good:
                self.good_latencies_ms.append(latency_ms)


def load(client: TorchServeClient, mix: Mix, answers: dict, tally: Tally, until: float, rng: random.Random,
         bad_fraction: float) -> None:
    """One client thread: requests back to back until ``until`` (time.monotonic())."""
    while time.monotonic() < until:
        request = pick(mix, rng, bad_fraction)
        outcome = bad_inputs.send(client, request.model, request.body, request.content_type)
        key, unexpected = verdict(request, outcome, answers)
        message = outcome.message or bad_inputs._short(outcome.answer or "")
        tally.add(key, unexpected, isinstance(request, GoodRequest), outcome.seconds * 1000, message)


def run_phase(client: TorchServeClient, mix: Mix, answers: dict, seconds: float, concurrency: int,
              bad_fraction: float, seed: int, report_every_s: float = 30.0) -> Tuple[Tally, float]:
    """``concurrency`` threads for ``seconds``; returns the tally and the wall time until the
    last answer (requests in flight at the deadline are finished and counted)."""
    tally = Tally()
    started = time.monotonic()
    until = started + seconds
    threads = [threading.Thread(target=load, args=(client, mix, answers, tally, until,
                                                   random.Random(seed * 1000 + i), bad_fraction), daemon=True)
               for i in range(concurrency)]
    for t in threads:
        t.start()
    next_report = started + report_every_s
    for t in threads:
        while t.is_alive():
            t.join(timeout=1.0)
            if time.monotonic() >= next_report:
                next_report += report_every_s
                with tally.lock:
                    done, bad = sum(tally.counts.values()), sum(tally.unexpected.values())
                log(f"  {time.monotonic() - started:.0f} s: {done + bad} answers, {bad} unexpected")
    return tally, time.monotonic() - started


def resident_memory(pids: Sequence[int]) -> Dict[int, Optional[int]]:
    """pid -> resident set size in bytes (None: the process is gone)."""
    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).memory_info().rss
        except psutil.Error:
            out[pid] = None
    return out


class PeakMemory:
    """Samples the workers' RSS every few seconds in the background; keeps each pid's peak."""

    def __init__(self, pids: Sequence[int], every_s: float = MEMORY_SAMPLE_S):
        self.pids, self.every_s = list(pids), every_s
        self.peak: Dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid, rss in resident_memory(self.pids).items():
                if rss is not None:
                    self.peak[pid] = max(self.peak.get(pid, 0), rss)
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def memory_report(pids_start: Dict[str, List[int]], pids_end: Dict[str, List[int]], start: Dict[int, Optional[int]],
                  end: Dict[int, Optional[int]], peak: Dict[int, int]) -> List[dict]:
    rows = []
    for model, pids in pids_start.items():
        for pid in pids:
            before, after = start.get(pid), end.get(pid)
            growth = (after - before) / before if before and after else None
            rows.append({"model": model, "pid": pid, "restarted": pid not in pids_end.get(model, []),
                         "rss_start_mb": _mb(before), "rss_end_mb": _mb(after), "rss_peak_mb": _mb(peak.get(pid)),
                         "growth_pct": None if growth is None else round(growth * 100, 2)})
    return rows


def _mb(value: Optional[int]) -> Optional[float]:
    return None if value is None else round(value / 2 ** 20, 1)


def run_soak(client: TorchServeClient, mix: Mix, seconds: float, concurrency: int, warmup_s: float,
             bad_fraction: float = 0.25, seed: int = 0) -> dict:
    """The whole soak against a ready server; returns the report (see summary())."""
    log(f"models {', '.join(mix.models)}: {sum(map(len, mix.goods.values()))} good requests, "
        f"{sum(map(len, mix.cases.values()))} bad cases; asking each one alone first")
    answers = correct_answers(client, mix)
    pids_before_warmup = bad_inputs.worker_pids(client, mix.models)
    log(f"warm-up: {warmup_s:.0f} s at concurrency {concurrency}")
    warm, _ = run_phase(client, mix, answers, warmup_s, concurrency, bad_fraction, seed)
    pids_start = bad_inputs.worker_pids(client, mix.models)
    all_pids = [p for pids in pids_start.values() for p in pids]
    memory_start = resident_memory(all_pids)
    load_start = os.getloadavg()[0]
    log(f"measuring: {seconds:.0f} s at concurrency {concurrency}; worker pids {pids_start}")
    with PeakMemory(all_pids) as peak:
        measured, wall_s = run_phase(client, mix, answers, seconds, concurrency, bad_fraction, seed + 1)
    memory_end = resident_memory(all_pids)
    load_end = os.getloadavg()[0]
    pids_end = bad_inputs.worker_pids(client, mix.models)
    memory = memory_report(pids_start, pids_end, memory_start, memory_end, peak.peak)
    restarted = {m: (pids_before_warmup[m], pids_end[m]) for m in mix.models if pids_before_warmup[m] != pids_end[m]}
    growths = [row["growth_pct"] for row in memory if row["growth_pct"] is not None]
    answered = sum(measured.counts.values()) + sum(measured.unexpected.values())
    good = measured.counts["ok"]
    return {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {"seconds": seconds, "warmup_s": warmup_s, "concurrency": concurrency,
                     "bad_fraction": bad_fraction, "seed": seed, "models": mix.models,
                     "cases": {m: [c.name for c in cs] for m, cs in mix.cases.items()},
                     "good_requests": {m: [g.name for g in gs] for m, gs in mix.goods.items()}},
        # Throughput and latency depend on what else the machine runs: its 1-minute load average.
        "machine": {"cpus": os.cpu_count(), "load_average_start": round(load_start, 2),
                    "load_average_end": round(load_end, 2)},
        "requests": answered, "wall_s": round(wall_s, 2),
        "throughput_rps": round(answered / wall_s, 2), "good_throughput_rps": round(good / wall_s, 2),
        "latency_ms": {"p50": _round(percentile(measured.latencies_ms, 50)),
                       "p99": _round(percentile(measured.latencies_ms, 99)),
                       "good_p50": _round(percentile(measured.good_latencies_ms, 50)),
                       "good_p99": _round(percentile(measured.good_latencies_ms, 99))},
        "good_answered": good,
        # "<model>/<case> <status>" -> count: refused as the case expects, or (200) answered correctly
        "expected_errors": dict(sorted((k, v) for k, v in measured.counts.items() if k != "ok" and not k.endswith(" 200"))),
        "valid_cases_answered": dict(sorted((k, v) for k, v in measured.counts.items() if k.endswith(" 200"))),
        "unexpected_errors": dict(sorted(measured.unexpected.items())),
        "unexpected_examples": measured.examples,
        "warmup": {"requests": sum(warm.counts.values()) + sum(warm.unexpected.values()),
                   "unexpected_errors": dict(sorted(warm.unexpected.items())),
                   "unexpected_examples": warm.examples},
        "memory": memory,
        "max_memory_growth_pct": max(growths) if growths else None,
        "restarted_workers": restarted,
    }


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 1)


def problems(report: dict, max_growth: float = MAX_MEMORY_GROWTH) -> List[str]:
    """What makes the soak fail: unexpected errors (either phase), restarts, memory growth."""
    out = [f"unexpected: {k} x{v} ({report['unexpected_examples'].get(k, '')})"
           for k, v in report["unexpected_errors"].items()]
    out += [f"unexpected during warm-up: {k} x{v} ({report['warmup']['unexpected_examples'].get(k, '')})"
            for k, v in report["warmup"]["unexpected_errors"].items()]
    out += [f"{m}: worker restarted (pids {a} -> {b})" for m, (a, b) in report["restarted_workers"].items()]
    for row in report["memory"]:
        if row["growth_pct"] is None:
            out.append(f"{row['model']} worker {row['pid']}: memory not measured at both ends (gone?)")
        elif row["growth_pct"] >= max_growth * 100:
            out.append(f"{row['model']} worker {row['pid']}: resident memory grew {row['growth_pct']}% "
                       f"({row['rss_start_mb']} -> {row['rss_end_mb']} MB)")
    return out


def summary(report: dict) -> str:
    s = report["settings"]
    lat = report["latency_ms"]
    lines = [f"soak: {s['seconds']:.0f} s measured after {s['warmup_s']:.0f} s warm-up, concurrency "
             f"{s['concurrency']}, {int(s['bad_fraction'] * 100)}% bad inputs, models {', '.join(s['models'])}",
             f"machine: {report['machine']['cpus']} CPUs, 1-minute load average "
             f"{report['machine']['load_average_start']} at start, {report['machine']['load_average_end']} at end",
             "",
             "| requests | throughput req/s | good answers/s | p50 ms | p99 ms | good p50 ms | good p99 ms "
             "| expected 4xx | unexpected |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| {report['requests']} | {report['throughput_rps']} | {report['good_throughput_rps']} | "
             f"{lat['p50']} | {lat['p99']} | {lat['good_p50']} | {lat['good_p99']} | "
             f"{sum(report['expected_errors'].values())} | {sum(report['unexpected_errors'].values())} |",
             "",
             "| worker | pid | RSS after warm-up MB | RSS at end MB | peak MB | growth |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in report["memory"]:
        growth = "n/a" if row["growth_pct"] is None else f"{row['growth_pct']:+.2f}%"
        lines.append(f"| {row['model']}{' (restarted)' if row['restarted'] else ''} | {row['pid']} | "
                     f"{row['rss_start_mb']} | {row['rss_end_mb']} | {row['rss_peak_mb']} | {growth} |")
    lines += ["", "expected 4xx by case: " + (", ".join(f"{k} x{v}" for k, v in report["expected_errors"].items())
                                              or "none"),
              "", "odd but valid inputs answered correctly: "
              + (", ".join(f"{k[:-4]} x{v}" for k, v in report["valid_cases_answered"].items()) or "none")]
    found = problems(report)
    lines += ["", "PROBLEMS:" if found else "no unexpected error, no restart, memory growth under "
                                              f"{MAX_MEMORY_GROWTH:.0%}"]
    lines += [f"  {p}" for p in found]
    return "\n".join(lines)


def write_report(report: dict, folder: str = RESULTS_DIR) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "latest.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return path


# ---------------------------------------------------------------------------------------------
# the server


def start_server(home: str, catalog: Catalog, models: Sequence[str], model_store: str = MODEL_STORE,
                 progress: Optional[Callable[[str], None]] = None) -> TorchServe:
    """A TorchServe of its own (free 127.0.0.1 ports, config as config.properties), each model's
    default version registered with its catalog settings; the caller stops it."""
    server = TorchServe.from_catalog(home, catalog, model_store)
    server.start()
    try:
        for name in models:
            entry = catalog.model(name)
            server.client.register(entry.mar_name, synchronous="true", **entry.registration())
        server.client.wait_ready(models, 600, progress)
    except BaseException:
        print(server.log_tail(), file=sys.stderr)
        server.stop()
        raise
    return server


def soak_models(catalog: Catalog, wanted: Optional[Sequence[str]], served: Optional[Sequence[str]] = None) -> List[str]:
    """The catalog's served models that have cases (and, against a running server, that it serves)."""
    models = bad_inputs.coverage(catalog)["run"]
    if served is not None:
        models = [m for m in models if m in served]
    if wanted:
        unknown = [m for m in wanted if m not in models]
        if unknown:
            raise SystemExit(f"cannot soak {', '.join(unknown)}: served models with cases are {', '.join(models)}")
        models = [m for m in models if m in wanted]
    return models


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="measured load (default 60)")
    parser.add_argument("--warmup", type=float, default=15.0, help="unmeasured load first (default 15)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--bad-fraction", type=float, default=0.25, help="share of bad cases in the mix")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", help="comma-separated (default: every served model with cases)")
    parser.add_argument("--skip-cases", default="", help="comma-separated model/case labels left out of the mix")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--against", choices=["running"], default="running",
                       help="the server of config.properties (make serve)")
    where.add_argument("--start", action="store_true", help="start a TorchServe of its own, stop it at the end")
    parser.add_argument("--out", default=RESULTS_DIR, help="folder for latest.json")
    args = parser.parse_args(argv)
    catalog = load_catalog()
    wanted = args.models.split(",") if args.models else None
    skip = [s for s in args.skip_cases.split(",") if s]
    server = None
    try:
        if args.start:
            models = soak_models(catalog, wanted)
            home = tempfile.mkdtemp(prefix="soak-ts-")
            log(f"starting TorchServe in {home} with {', '.join(models)}")
            server = start_server(home, catalog, models, progress=lambda state: None)
            client = server.client
        else:
            client = bad_inputs.running_client()
            models = soak_models(catalog, wanted, [m["modelName"] for m in client.list_models()])
        report = run_soak(client, request_mix(models, catalog, skip), args.seconds, args.concurrency,
                          args.warmup, args.bad_fraction, args.seed)
    finally:
        if server is not None:
            server.stop()
    report["settings"]["skipped_cases"] = skip
    print(summary(report))
    print(f"\nwritten: {write_report(report, args.out)}")
    return 1 if problems(report) else 0


if __name__ == "__main__":
    sys.exit(main())
