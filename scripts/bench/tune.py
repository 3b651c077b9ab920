"""`make tune`: the fastest setting of every served model on this machine, within its fidelity gate
and its latency budget, written as this machine's tuned profile (build/tuned/<key>.json, see
scripts/serving/tuned_profile.py) that `make serve` then uses.

For each model the catalog loads at start (its default version), the candidates are the catalog's
archives of that model (fp32, TorchScript, ONNX, int8, bf16...) that are in model_store/, match
SHA256SUMS and today's catalog entry, and whose recorded fidelity figures pass today's gate: the
tuner never relaxes a gate and never measures a missing, modified, stale or refused archive.
Each setting is measured on one real TorchServe (its own home, free 127.0.0.1 ports) as a tuned
copy of the archive (model-config.yaml's batchSize, maxBatchDelay, workers and
handler.runtime.threads set; TorchServe 0.12 applies an archive's own values over config.properties),
registered under the model's own name, its answers checked one request at a time, then loaded by
the bench's wrk client (scripts/bench/loadgen.py: C, one event loop, loopback, fixed duration) at
--concurrency connections: throughput, p50, p99, client CPU, other programs' CPU.

The search is staged, so that its time stays bounded:
  1. archive   every candidate with the catalog's setting (threads: the catalog's, auto = cores/workers);
  2. workers   the best archive(s) of step 1 with each (workers, threads per worker) pair;
  3. batching  the best of step 2 with each batchSize x maxBatchDelay of the grid;
  4. latency   concurrency 1, batchSize 1 (TorchServe then never waits for a batch), one worker.
The throughput pick is the highest throughput whose p99 stays within the catalog's
tuning.latency_budget_ms (ties within 2%: the lower p99); when no setting meets the budget, the
lowest-p99 setting is picked with a warning (the catalog's setting, measured in step 1, did no
better). The latency pick is the lowest p50 of step 4. `--quick` (CI-sized: ~2.5 s per setting,
one archive kept, a small grid) or the full grid (10 s per setting, two archives kept):

    python -m scripts.bench.tune [--quick] [--models digits,diabetes] [--seconds S] [--warmup S]
                           [--concurrency 16] [--out build/tuned] [--max-minutes M]

Prints every table and pick; writes <out>/<key>.json (the profile) and <out>/<key>.md.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence

from models.catalog import MODEL_STORE, ROOT, Catalog, ModelEntry, load_catalog
from scripts.bench import loadgen, measure, report, served
from scripts.serving import tuned_profile as tp
from scripts.serving.ts_server import TorchServe

STAGES = ("archive", "workers", "batching", "latency")
# Request bodies per model: each setting's answers are checked one request at a time (Python)
# before wrk loads it with the same bodies in turn; 16 keep that check short (89 diabetes rows).
MAX_INPUTS = 16


@dataclass(frozen=True)
class Grid:
    seconds: float
    warmup_s: float
    keep: int                    # archives carried from step 1 into steps 2 and 3
    batch_sizes: tuple
    delays_ms: tuple
    latency_archives: int        # archives measured at concurrency 1 (best of step 1 first)
    latency_threads: str         # "catalog": the catalog's threads; "both": 1 and every core


# Quick: registering a setting (starting its workers) costs more than measuring it, so the quick
# grid leaves out what rarely wins at 16 connections (batch 1: the latency stage measures it) and
# tries the catalog's delay only.
QUICK = Grid(seconds=2.5, warmup_s=1.0, keep=1, batch_sizes=(4, 8, 16), delays_ms=(),
             latency_archives=2, latency_threads="catalog")
FULL = Grid(seconds=10.0, warmup_s=2.0, keep=2, batch_sizes=(1, 2, 4, 8, 16, 32), delays_ms=(1, 2, 5, 10, 20),
            latency_archives=99, latency_threads="both")


def log(message: str) -> None:
    print(f"[tune] {message}", flush=True)


# -- what to measure -----------------------------------------------------------------------------
def thread_pairs(cores: int) -> List[tuple]:
    """(workers, threads per worker) within the cores: powers of two of workers, each with every
    core it may have and with one thread (on 2 cores: (1, 2), (1, 1), (2, 1))."""
    pairs = []
    workers = 1
    while workers <= cores:
        for threads in dict.fromkeys((cores // workers, 1)):
            pairs.append((workers, threads))
        workers *= 2
    return pairs


def catalog_setting(entry: ModelEntry, cores: int) -> tp.Setting:
    """The catalog's setting, as the worker resolves it (threads auto = cores / workers). A delay
    of 0 becomes 1: TorchServe 0.12 starts an archive whose maxBatchDelay is 0 with 100 ms."""
    s = entry.serving
    threads = (entry.handler_config.get("runtime") or {}).get("threads", "auto")
    threads = max(1, cores // max(1, s["maxWorkers"])) if threads in (None, "auto") else int(threads)
    return tp.Setting(s["batchSize"], max(1, s["maxBatchDelay"]), s["minWorkers"], threads)


def batching_settings(grid: Grid, best: tp.Setting, catalog_delay: int) -> List[tp.Setting]:
    """batchSize x maxBatchDelay for the workers/threads of ``best``; batchSize 1 once (it never
    waits: its delay is left at 1 ms)."""
    delays = sorted({*grid.delays_ms, max(1, catalog_delay)})
    out = []
    for batch in grid.batch_sizes:
        for delay in ([1] if batch == 1 else delays):
            out.append(tp.Setting(batch, delay, best.workers, best.threads))
    return out


# -- measuring one setting -----------------------------------------------------------------------
class Tuner:
    def __init__(self, catalog: Catalog, server: TorchServe, store: str, workdir: str, grid: Grid,
                 concurrency: int, deadline: Optional[float], source_store: str = MODEL_STORE):
        self.catalog, self.server, self.store, self.workdir = catalog, server, store, workdir
        self.grid, self.concurrency, self.deadline = grid, concurrency, deadline
        self.source_store = source_store
        self.cores = tp.available_cores()
        self.skipped = 0

    def measure(self, stage: str, candidate: tp.Candidate, setting: tp.Setting, inputs: Dict[str, bytes],
                concurrency: int) -> Optional[dict]:
        if self.deadline and time.monotonic() > self.deadline:
            self.skipped += 1
            return None
        entry = candidate.entry
        stem = entry.mar_name[:-len(".mar")]
        name = f"{stem}-{setting.label()}.mar"
        path = os.path.join(self.store, name)
        tp.derive_archive(os.path.join(self.source_store, entry.mar_name), path, setting,
                          {"tuning": stage, "source": entry.mar_name, "source_sha256": candidate.sha256})
        registration = {"batch_size": setting.batch_size, "max_batch_delay": setting.max_batch_delay_ms,
                        "initial_workers": setting.workers, "response_timeout": entry.serving["responseTimeout"]}
        variant = served.ServedVariant(f"{stem} {setting.label()} c{concurrency}", entry.base, name,
                                      registration, inputs, measure.CONTENT_TYPES[entry.family],
                                      measure.ITEM_UNITS[entry.family])
        started = time.perf_counter()
        result = measure.attempt(variant.key, lambda: served.measure_served(
            self.server, variant, concurrency, self.grid.warmup_s, self.grid.seconds, "wrk", self.workdir),
            variant.unit)
        os.remove(path)
        out = row(stage, candidate, setting, concurrency, result)
        out["wall_s"] = round(time.perf_counter() - started, 1)  # registration and checks included
        return out


def row(stage: str, candidate: tp.Candidate, setting: tp.Setting, concurrency: int,
        result: measure.Measurement) -> dict:
    failure = result.failure
    applied = result.settings or {}
    if not failure:
        wanted = (setting.batch_size, setting.max_batch_delay_ms, setting.workers)
        got = (applied.get("batch_size"), applied.get("max_batch_delay_ms"), applied.get("workers"))
        bad = [a for a in result.answers.values() if str(a).startswith("HTTP ")]
        if got != wanted:
            failure = f"TorchServe applied batch/delay/workers {got}, not {wanted}"
        elif bad:
            failure = f"answer check failed: {bad[0]}"
        elif result.items == 0:  # wrk reports only completed requests: nothing to rank it by
            failure = f"no answer completed in the {result.seconds:.1f} s measured"
    return {"stage": stage, "archive": candidate.entry.mar_name, "variant": candidate.entry.variant,
            "order": candidate.order, "batch_size": setting.batch_size,
            "max_batch_delay_ms": setting.max_batch_delay_ms, "workers": setting.workers,
            "threads": setting.threads, "concurrency": concurrency, "unit": result.unit,
            "throughput": round(result.throughput, 1), "p50_ms": measure.rounded(result.percentile(50), 2),
            "p99_ms": measure.rounded(result.percentile(99), 2), "errors": sum(result.errors.values()),
            "client_cpu_cores": measure.rounded(result.client_cpu_cores, 3),
            "foreign_cpu_cores": measure.rounded(result.foreign_cpu_cores, 2),
            "seconds": round(result.seconds, 2), "failure": failure}


def ranked_archives(rows: Sequence[dict], budget_ms: float) -> List[str]:
    """Archives by their best usable row: within the budget first, then by throughput."""
    best: Dict[str, tuple] = {}
    for r in rows:
        if tp.usable(r):
            score = (r["p99_ms"] <= budget_ms, r["throughput"])
            best[r["archive"]] = max(best.get(r["archive"], score), score)
    return sorted(best, key=lambda a: best[a], reverse=True)


def tune_model(tuner: Tuner, name: str) -> dict:
    catalog, grid = tuner.catalog, tuner.grid
    default = catalog.model(name)
    budget = default.tuning["latency_budget_ms"]
    found = tp.candidates(catalog, name, tuner.source_store)
    for c in found:
        log(f"{name}: {c.entry.mar_name:<34} {c.status}{f' ({c.reason})' if c.reason else ''}")
    usable = [c for c in found if c.ok]
    by_archive = {c.entry.mar_name: c for c in usable}
    inputs = dict(list(measure.INPUTS[name]().items())[:MAX_INPUTS])
    rows: List[dict] = []
    measured = set()

    def run(stage, candidate, setting, concurrency):
        key = (candidate.entry.mar_name, setting, concurrency)
        if key in measured:
            return
        measured.add(key)
        result = tuner.measure(stage, candidate, setting, inputs, concurrency)
        if result:
            result["within_budget"] = None if concurrency == 1 else (
                tp.usable(result) and result["p99_ms"] <= budget)
            rows.append(result)

    base = {c.entry.mar_name: catalog_setting(c.entry, tuner.cores) for c in usable}
    for c in usable:                                                         # 1. archives
        run("archive", c, base[c.entry.mar_name], tuner.concurrency)
    kept = [by_archive[a] for a in ranked_archives(rows, budget)[:grid.keep]]
    for c in kept:                                                           # 2. workers x threads
        b = base[c.entry.mar_name]
        for workers, threads in thread_pairs(tuner.cores):
            run("workers", c, tp.Setting(b.batch_size, b.max_batch_delay_ms, workers, threads), tuner.concurrency)
    for c in kept:                                                           # 3. batching
        best, _ = tp.choose_throughput([r for r in rows if r["archive"] == c.entry.mar_name], budget)
        if best is None:
            continue
        for setting in batching_settings(grid, tp.Setting.of(best), default.serving["maxBatchDelay"]):
            run("batching", c, setting, tuner.concurrency)
    for archive in ranked_archives(rows, budget)[:grid.latency_archives]:    # 4. latency
        both = grid.latency_threads == "both"
        for threads in sorted({tuner.cores, 1} if both else {base[archive].threads}, reverse=True):
            run("latency", by_archive[archive], tp.Setting(1, 1, 1, threads), 1)
    throughput_rows = [r for r in rows if r["concurrency"] != 1]
    picks = {}
    for mode, (pick, note) in (("throughput", tp.choose_throughput(throughput_rows, budget)),
                               ("latency", tp.choose_latency(rows))):
        if pick:
            picks[mode] = {**pick, "sha256": by_archive[pick["archive"]].sha256, "note": note}
        log(f"{name}: {mode} pick: {tp.describe_pick(pick) if pick else '-'} ({note})")
    catalog_row = next((r for r in rows if r["stage"] == "archive" and r["variant"] == "fp32"), None)
    return {"version": default.version, "latency_budget_ms": budget, "concurrency": tuner.concurrency,
            "candidates": [c.summary() for c in found], **picks, "catalog_setting": catalog_row,
            "table": rows}


# -- report --------------------------------------------------------------------------------------
def _f(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table_lines(name: str, tuned: dict) -> List[str]:
    picks = {m: tuned.get(m) for m in tp.MODES}
    lines = [f"### {name} (p99 budget {tuned['latency_budget_ms']:g} ms at {tuned['concurrency']} connections)",
             "", "| stage | archive | batch | delay ms | workers x threads | conns | items/s | p50 ms | "
             "p99 ms | errors | client cores | other cores | verdict |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in tuned["table"]:
        marks = [m for m, p in picks.items() if p and all(p[k] == r[k] for k in
                 ("archive", "batch_size", "max_batch_delay_ms", "workers", "threads", "concurrency"))]
        if r["failure"]:
            verdict = f"failed: {r['failure'][:60]}"
        elif r["within_budget"] is False:
            verdict = "over budget" if not r["errors"] else "errors"
        else:
            verdict = ""
        verdict = ", ".join([*(f"**{m} pick**" for m in marks), *([verdict] if verdict else [])])
        lines.append(f"| {r['stage']} | {r['archive']} | {r['batch_size']} | {r['max_batch_delay_ms']} | "
                     f"{r['workers']} x {r['threads']} | {r['concurrency']} | {_f(r['throughput'])} | "
                     f"{_f(r['p50_ms'])} | {_f(r['p99_ms'])} | {r['errors']} | {_f(r['client_cpu_cores'], 2)} | "
                     f"{_f(r['foreign_cpu_cores'], 2)} | {verdict} |")
    refused = [c for c in tuned["candidates"] if c["status"] != "ok"]
    lines.append("")
    noisy = [r for r in tuned["table"] if (r.get("foreign_cpu_cores") or 0) > measure.FOREIGN_CPU_WARNING]
    if noisy:
        lines.append(f"- WARNING: {len(noisy)} of {len(tuned['table'])} settings were measured while other "
                     f"programs used more than {measure.FOREIGN_CPU_WARNING:g} cores: tune again on a quiet "
                     f"machine before trusting close picks")
    for c in refused:
        lines.append(f"- not a candidate: {c['archive']} ({c['status']}: {c['reason']})")
    for mode in tp.MODES:
        pick = tuned.get(mode)
        lines.append(f"- {mode} pick: {tp.describe_pick(pick) + ' (' + pick['note'] + ')' if pick else 'none'}")
    return lines + [""]


def markdown(profile: dict) -> str:
    m = profile["machine"]
    lines = [f"# Tuned profile {profile['key']}", "",
             f"`make tune{' --quick' if profile['mode'] == 'quick' else ''}` on {m['description']} "
             f"({m['cpu_capability']}, {m['cores']} cores, GPU {m['gpu']}, torch {m['torch']}), "
             f"{profile['created']}, {profile['duration_s']:.0f} s; {profile['seconds']:g} s per setting after "
             f"{profile['warmup_s']:g} s of warm-up, wrk at {profile['concurrency']} connections "
             f"(latency rows: 1). Figures of a busy machine move by tens of percent: see 'other cores'.", ""]
    for name, tuned in profile["models"].items():
        lines += table_lines(name, tuned)
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------
def parse_args(argv, tunable: Sequence[str]):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized: few settings, ~2.5 s each")
    parser.add_argument("--models", nargs="+", default=None, help=f"default: {','.join(tunable)}")
    parser.add_argument("--seconds", type=float, help="measured seconds per setting (quick 2.5, full 10)")
    parser.add_argument("--warmup", type=float, help="unreported seconds before each (quick 1, full 2)")
    parser.add_argument("--concurrency", type=int, default=16, help="connections (default 16, the bench's)")
    parser.add_argument("--out", default=tp.PROFILE_DIR, help="profile folder (default build/tuned)")
    parser.add_argument("--store", default=MODEL_STORE, help="archives to tune (default model_store)")
    parser.add_argument("--max-minutes", type=float,
                        help="stop measuring after this long (picks from what was measured)")
    args = parser.parse_args(argv)
    models = [m for item in (args.models or tunable) for m in item.split(",") if m]
    unknown = sorted(set(models) - set(tunable))
    if unknown:
        parser.error(f"--models: {', '.join(unknown)} not among the tunable models {', '.join(tunable)}")
    args.models = models
    base = QUICK if args.quick else FULL
    args.grid = Grid(**{**base.__dict__, **{k: v for k, v in (("seconds", args.seconds),
                                                             ("warmup_s", args.warmup)) if v is not None}})
    return args


def tunable(catalog: Catalog) -> List[str]:
    """Models loaded at start (default versions) that declare a budget and have bench inputs."""
    out = []
    for m in catalog.loaded_at_start:
        if not m.is_default or m.variant != "fp32":
            continue
        if not m.tuning:
            log(f"{m.name}: no tuning.latency_budget_ms in the catalog: not tuned")
        elif m.name not in measure.INPUTS:
            log(f"{m.name}: no inputs (INPUTS in scripts/bench/measure.py): not tuned")
        else:
            out.append(m.name)
    return out


def main(argv=None) -> int:
    catalog = load_catalog()
    args = parse_args(argv, tunable(catalog))
    started = time.perf_counter()
    loadgen.find_wrk()  # fails at once, naming the command that installs it
    facts = tp.machine_facts()
    key = tp.profile_key(facts)
    log(f"machine key {key}; models {', '.join(args.models)}; {'quick' if args.quick else 'full'} grid, "
        f"{args.grid.seconds:g} s per setting, {args.concurrency} connections")
    workdir = tempfile.mkdtemp(prefix="ts-tune-")
    store = os.path.join(workdir, "store")
    os.makedirs(store)
    server = TorchServe.from_catalog(os.path.join(workdir, "server"), catalog, store)
    deadline = time.monotonic() + args.max_minutes * 60 if args.max_minutes else None
    tuner = Tuner(catalog, server, store, workdir, args.grid, args.concurrency, deadline, args.store)
    models, ok = {}, False
    try:
        server.start()
        for name in args.models:
            models[name] = tune_model(tuner, name)
        ok = True
    finally:
        server.stop()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"kept {workdir} (server logs) for a look")
    if tuner.skipped:
        log(f"--max-minutes reached: {tuner.skipped} setting(s) not measured")
    profile = {"format": tp.FORMAT, "key": key, "machine": {**facts, "description": report.machine_description(),
                                                            "torchserve": report.package_version("torchserve")},
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "mode": "quick" if args.quick else "full", "seconds": args.grid.seconds,
               "warmup_s": args.grid.warmup_s, "concurrency": args.concurrency,
               "duration_s": round(time.perf_counter() - started, 1), "models": models}
    path = tp.write_profile(profile, args.out)
    text = markdown(profile)
    with open(path[:-len(".json")] + ".md", "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print("\n" + text, flush=True)
    shown = os.path.relpath(path, ROOT) if path.startswith(ROOT) else path
    log(f"done in {profile['duration_s']:.0f} s; profile {shown} (and .md); `make serve` uses it")
    untuned = [n for n, t in models.items() if not t.get("throughput")]
    return 1 if untuned else 0


if __name__ == "__main__":
    sys.exit(main())
