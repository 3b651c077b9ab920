"""`make bench`: ResNet-18 in-process vs served by this project vs TorchServe's stock handler.

One run, the same weights (model_store/resnet18.mar) and the same two photographs for all of:
  (a) in-process: the handler's own stages (wire -> vision -> model -> outputs) in this process,
      in batches of the catalog's batchSize, with the served worker's thread budget;
  (b) this project's resnet18.mar on a real TorchServe, with the catalog's serving settings;
  (c) TorchServe's stock image_classifier handler with TorchServe's defaults (batch size 1,
      one worker per CPU core);
  (d) the same stock archive with (b)'s batching and workers.
The served variants share one TorchServe and are measured one after the other: each is registered,
loaded by --concurrency client threads (one keep-alive session each, raw JPEG bodies), then
unregistered. Only 200 answers inside the measured window count; the rest are reported as errors.

    python -m scripts.bench [--seconds 20] [--concurrency 16] [--warmup 2] [--only a,b,c,d]

Results: a table on stdout, build/bench/latest.json and build/bench/latest.md.
"""
import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# handler_kit travels at the top level of every archive, so it is imported by that name here too.
for _path in (ROOT, os.path.join(ROOT, "handlers")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from handler_kit import outputs, runtime, vision, wire  # noqa: E402
from handler_kit.config import parse_image_classifier  # noqa: E402

from models import sample_data  # noqa: E402
from scripts.catalog import MODEL_STORE, ModelEntry, load_catalog  # noqa: E402
from scripts.ts_server import TorchServe  # noqa: E402

MODEL = "resnet18"
RESULTS_DIR = os.path.join(ROOT, "build", "bench")
ALL_VARIANTS = ("a", "b", "c", "d")
TITLES = {
    "a": "(a) in-process pipeline",
    "b": "(b) served, this project's handler",
    "c": "(c) served, stock image_classifier, TorchServe defaults",
    "d": "(d) served, stock image_classifier, (b)'s batching",
}
# (numerator, denominator) -> the lowest acceptable throughput ratio, None where there is none.
RATIO_TARGETS = {("b", "a"): 0.85, ("b", "d"): 1.2, ("b", "c"): None}
# Other programs on the machine using more than this many cores make a measurement suspect.
FOREIGN_CPU_WARNING = 0.25
STOCK_ARCHIVE = "resnet18_stock"
STOCK_MODEL_FILE = '''"""ResNet-18 for TorchServe's stock handler: the archive's model file must hold one class."""
from torchvision.models.resnet import BasicBlock, ResNet


class ImageClassifier(ResNet):
    def __init__(self):
        super().__init__(BasicBlock, [2, 2, 2, 2])
'''


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


# -- results -------------------------------------------------------------------------------------
@dataclass
class Measurement:
    variant: str
    images: int = 0
    seconds: float = 0.0
    latencies_ms: List[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    latency_unit: str = "request"
    settings: dict = field(default_factory=dict)
    top1: Dict[str, str] = field(default_factory=dict)
    first_error: Optional[str] = None
    foreign_cpu_cores: Optional[float] = None  # CPU used by other programs while measuring

    @property
    def throughput(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> Optional[float]:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None

    def summary(self) -> dict:
        return {"title": TITLES[self.variant], "throughput_img_s": round(self.throughput, 2),
                "p50_ms": _round(self.percentile(50)), "p99_ms": _round(self.percentile(99)),
                "latency_of": self.latency_unit, "images_ok": self.images,
                "measured_s": round(self.seconds, 3), "errors": sum(self.errors.values()),
                "errors_by_kind": {str(k): v for k, v in self.errors.items()},
                "first_error": self.first_error, "foreign_cpu_cores": _round(self.foreign_cpu_cores, 2),
                "settings": self.settings, "top1": self.top1}


def _round(value: Optional[float], digits: int = 1) -> Optional[float]:
    return None if value is None else round(value, digits)


def top1_label(body) -> str:
    """Best label from either handler's answer: this project's [{label, ...}, ...] or the stock
    handler's {label: probability}."""
    if isinstance(body, list) and body and isinstance(body[0], dict) and "label" in body[0]:
        return body[0]["label"]
    if isinstance(body, dict) and body and all(isinstance(v, (int, float)) for v in body.values()):
        return max(body, key=body.get)
    return f"unexpected answer {str(body)[:60]}"


# -- CPU contention ------------------------------------------------------------------------------
class ForeignCpu:
    """Cores' worth of CPU that programs other than this benchmark (this process and the
    processes under ``roots``) used during a measurement: on a small, shared machine a
    neighbour's build or test run changes the numbers more than any handler change does."""

    def __init__(self, roots: Sequence[Optional[int]] = ()):
        self.roots = [pid for pid in roots if pid]

    def _ours_s(self) -> float:
        processes = [psutil.Process()]
        for pid in self.roots:
            try:
                root = psutil.Process(pid)
                processes += [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
        total = 0.0
        for process in processes:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                continue
        return total

    @staticmethod
    def _busy_s() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "steal", 0.0)

    def start(self) -> None:
        self._begin = (time.perf_counter(), self._busy_s(), self._ours_s())

    def cores(self) -> float:
        wall, busy, ours = self._begin
        elapsed = time.perf_counter() - wall
        foreign = (self._busy_s() - busy) - (self._ours_s() - ours)
        return max(0.0, foreign / elapsed) if elapsed > 0 else 0.0


# -- inputs --------------------------------------------------------------------------------------
def load_photos() -> Dict[str, bytes]:
    return dict(zip(sample_data.PHOTO_NAMES, sample_data.photo_bytes()))


def extract_archive(mar_path: str, out_dir: str, names: Sequence[str]) -> str:
    with zipfile.ZipFile(mar_path) as archive:
        for name in names:
            archive.extract(name, out_dir)
    return out_dir


# -- (a) in-process ------------------------------------------------------------------------------
class InProcessPipeline:
    """The served handler's stages, configured from the archive's own model-config.yaml so that
    it runs what the worker runs; only TorchServe (HTTP, frontend batching, IPC) is left out."""

    def __init__(self, archive_dir: str, entry: ModelEntry):
        with open(os.path.join(archive_dir, "model-config.yaml"), encoding="utf-8") as f:
            self.config = parse_image_classifier(yaml.safe_load(f)["handler"])
        cfg = self.config
        # A worker gets a GPU from TorchServe whenever one exists; mirror that choice.
        self.device = runtime.select_device(cfg.runtime.device, 0 if torch.cuda.is_available() else None)
        self.threads = torch.get_num_threads()
        if self.device.type == "cpu":
            self.threads = runtime.thread_budget(cfg.runtime.threads, entry.serving["maxWorkers"],
                                                 runtime.available_cores())
            runtime.apply_thread_budget(self.threads)
        self.model = runtime.build_model(cfg.model.module, cfg.model.factory, cfg.model.kwargs,
                                         os.path.join(archive_dir, cfg.model.weights), self.device,
                                         cfg.runtime.channels_last)
        self.labels = outputs.load_labels(os.path.join(archive_dir, cfg.labels),
                                          cfg.model.kwargs.get("num_classes"))

    def __call__(self, bodies: Sequence[bytes]) -> list:
        image_cfg, cfg = self.config.image, self.config
        images = [vision.resize_and_crop(vision.decode(wire.binary_payload({"body": body}),
                                                       image_cfg.color, image_cfg.max_pixels),
                                         image_cfg.resize, image_cfg.crop)
                  for body in bodies]
        inputs = vision.to_batch(images, image_cfg.mean, image_cfg.std, cfg.runtime.channels_last)
        with torch.inference_mode(), runtime.autocast(self.device, cfg.runtime.dtype):
            logits = self.model(inputs.to(self.device, non_blocking=True))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return outputs.topk_predictions(logits, self.labels, cfg.topk)


def measure_in_process(entry: ModelEntry, photos: Dict[str, bytes], warmup_s: float,
                       seconds: float, workdir: str) -> Measurement:
    archive_dir = extract_archive(os.path.join(MODEL_STORE, entry.mar_name),
                                  os.path.join(workdir, "archive"),
                                  ("model-config.yaml", "weights.pt", "labels.json"))
    pipeline = InProcessPipeline(archive_dir, entry)
    batch_size = entry.serving["batchSize"]
    bodies = list(photos.values())
    batch = [bodies[i % len(bodies)] for i in range(batch_size)]
    result = Measurement("a", latency_unit=f"batch of {batch_size}",
                         settings={"batch_size": batch_size, "threads": pipeline.threads,
                                   "device": str(pipeline.device),
                                   "channels_last": pipeline.config.runtime.channels_last})
    result.top1 = {name: pipeline([body])[0][0]["label"] for name, body in photos.items()}
    log(f"(a) batch {batch_size}, {pipeline.threads} thread(s) on {pipeline.device}: "
        f"warming up {warmup_s:g} s, then measuring {seconds:g} s")
    run_batches(pipeline, batch, warmup_s)
    foreign = ForeignCpu()
    foreign.start()
    result.latencies_ms, result.seconds = run_batches(pipeline, batch, seconds)
    result.foreign_cpu_cores = foreign.cores()
    result.images = len(result.latencies_ms) * batch_size
    del pipeline
    gc.collect()  # give the model's memory back before the server's workers start
    return result


def run_batches(pipeline: InProcessPipeline, batch: List[bytes], seconds: float):
    """Back-to-back batches for ``seconds`` (at least one): per-batch ms and the elapsed time."""
    latencies = []
    started = time.perf_counter()
    while not latencies or time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        pipeline(batch)
        latencies.append((time.perf_counter() - t0) * 1000)
    return latencies, time.perf_counter() - started


# -- served variants -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ServedVariant:
    key: str
    model_name: str
    archive: str           # file name in the server's model store
    registration: dict     # management API parameters beyond url and model_name


def served_variants(entry: ModelEntry, keys: Sequence[str]) -> List[ServedVariant]:
    serving = entry.serving
    catalog_batching = {"batch_size": serving["batchSize"], "max_batch_delay": serving["maxBatchDelay"],
                        "initial_workers": serving["minWorkers"],
                        "response_timeout": serving["responseTimeout"]}
    stock_mar = f"{STOCK_ARCHIVE}.mar"
    variants = [
        ServedVariant("b", entry.name, entry.mar_name, catalog_batching),
        # Without initial_workers a registered model gets no worker at all; TorchServe's own
        # default (default_workers_per_model) is one worker per CPU core on a CPU host.
        ServedVariant("c", "resnet18_stock_default", stock_mar,
                      {"initial_workers": os.cpu_count() or 1}),
        ServedVariant("d", "resnet18_stock_batched", stock_mar, catalog_batching),
    ]
    return [v for v in variants if v.key in keys]


def build_stock_archive(entry: ModelEntry, store: str, workdir: str) -> str:
    """The same weights packaged the way TorchServe's examples do: model file + state_dict +
    index_to_name.json, served by the built-in ``image_classifier`` handler."""
    src = extract_archive(os.path.join(MODEL_STORE, entry.mar_name), os.path.join(workdir, "stock"),
                          ("weights.pt", "labels.json"))
    model_file = os.path.join(src, "stock_resnet18.py")
    with open(model_file, "w", encoding="utf-8") as f:
        f.write(STOCK_MODEL_FILE)
    with open(os.path.join(src, "labels.json"), encoding="utf-8") as f:
        labels = json.load(f)
    index_to_name = os.path.join(src, "index_to_name.json")
    with open(index_to_name, "w", encoding="utf-8") as f:
        json.dump({str(i): label for i, label in enumerate(labels)}, f)
    archiver = os.path.join(os.path.dirname(sys.executable), "torch-model-archiver")
    subprocess.run([archiver, "--model-name", STOCK_ARCHIVE, "--version", entry.version,
                    "--model-file", model_file, "--serialized-file", os.path.join(src, "weights.pt"),
                    "--handler", "image_classifier", "--extra-files", index_to_name,
                    "--export-path", store, "--force"], check=True, cwd=src)
    return os.path.join(store, f"{STOCK_ARCHIVE}.mar")


def prepare_store(entry: ModelEntry, keys: Sequence[str], workdir: str) -> str:
    """A store of its own, so that the stock archive never lands in model_store/."""
    store = os.path.join(workdir, "store")
    os.makedirs(store)
    os.symlink(os.path.join(MODEL_STORE, entry.mar_name), os.path.join(store, entry.mar_name))
    if {"c", "d"} & set(keys):
        log("building the stock-handler archive with torch-model-archiver")
        build_stock_archive(entry, store, workdir)
    return store


def register(server: TorchServe, variant: ServedVariant) -> dict:
    client = server.client
    log(f"({variant.key}) registering {variant.model_name} ({variant.archive}, "
        f"{variant.registration or 'defaults'})")
    client.register(url=variant.archive, model_name=variant.model_name, synchronous="true",
                    **variant.registration)
    last = [time.monotonic()]

    def progress(state):
        if time.monotonic() - last[0] >= 10:
            last[0] = time.monotonic()
            log(f"    waiting: {state}")

    client.wait_ready([variant.model_name], timeout_s=300, progress=progress)
    # What TorchServe actually applied: a model-config.yaml in the archive can override the API.
    described = client.describe(variant.model_name)[0]
    return {"batch_size": described.get("batchSize"), "max_batch_delay_ms": described.get("maxBatchDelay"),
            "workers": len(described.get("workers", [])),
            "response_timeout_s": described.get("responseTimeout"),
            "registered_with": variant.registration or "TorchServe defaults"}


def served_top1(server: TorchServe, model_name: str, photos: Dict[str, bytes]) -> Dict[str, str]:
    out = {}
    for name, body in photos.items():
        response = server.client.predict_raw(model_name, body)
        out[name] = (top1_label(response.json()) if response.status_code == 200
                     else f"HTTP {response.status_code}: {response.text[:80]}")
    return out


class LoadGenerator:
    """``concurrency`` threads, each with its own keep-alive session, posting raw image bytes
    back to back. Answers completed inside [warm-up end, end] are the measurement."""

    def __init__(self, url: str, headers: dict, bodies: Sequence[bytes], concurrency: int,
                 timeout_s: float, foreign: ForeignCpu):
        self.url, self.headers, self.bodies = url, headers, list(bodies)
        self.concurrency, self.timeout_s = concurrency, timeout_s
        self.foreign = foreign
        self.records: List[tuple] = []  # (completed at, latency ms, status); list.append is atomic
        self.first_error: Optional[str] = None
        self._start = threading.Barrier(concurrency + 1)
        self.window = (0.0, 0.0)

    def _worker(self, index: int) -> None:
        session = requests.Session()
        session.headers.update(self.headers)
        self._start.wait()
        measure_to = self.window[1]
        n = index  # threads start on different photographs so both are always in flight
        while True:
            t0 = time.perf_counter()
            if t0 >= measure_to:
                break
            try:
                response = session.post(self.url, data=self.bodies[n % len(self.bodies)],
                                        timeout=self.timeout_s)
                status = response.status_code
                if status != 200 and self.first_error is None:
                    self.first_error = f"HTTP {status}: {response.text[:200]}"
            except requests.RequestException as exc:
                status = type(exc).__name__
                if self.first_error is None:
                    self.first_error = f"{status}: {exc}"
            t1 = time.perf_counter()
            self.records.append((t1, (t1 - t0) * 1000, status))
            n += 1
        session.close()

    def run(self, warmup_s: float, seconds: float, variant: str) -> Measurement:
        threads = [threading.Thread(target=self._worker, args=(i,), daemon=True)
                   for i in range(self.concurrency)]
        for thread in threads:
            thread.start()
        now = time.perf_counter()
        self.window = (now + warmup_s, now + warmup_s + seconds)
        self._start.wait()
        time.sleep(max(0.0, self.window[0] - time.perf_counter()))
        self.foreign.start()
        self._report_progress(seconds)
        foreign_cores = self.foreign.cores()
        for thread in threads:
            thread.join()
        result = self._measurement(variant)
        result.foreign_cpu_cores = foreign_cores
        return result

    def _report_progress(self, seconds: float, every_s: float = 5.0) -> None:
        while True:
            left = self.window[1] - time.perf_counter()
            if left <= 0:
                return
            time.sleep(min(every_s, left))
            now = time.perf_counter()
            if now < self.window[1]:
                ok = sum(1 for t, _, s in list(self.records) if s == 200 and t >= self.window[0])
                log(f"    {now - self.window[0]:.0f}/{seconds:g} s: {ok} answers")

    def _measurement(self, variant: str) -> Measurement:
        start, end = self.window
        inside = [(ms, status) for t, ms, status in self.records if start <= t <= end]
        result = Measurement(variant, seconds=end - start, first_error=self.first_error)
        result.latencies_ms = [ms for ms, status in inside if status == 200]
        result.images = len(result.latencies_ms)
        result.errors = Counter(status for _, status in inside if status != 200)
        return result


def measure_served(server: TorchServe, variant: ServedVariant, photos: Dict[str, bytes],
                   concurrency: int, warmup_s: float, seconds: float) -> Measurement:
    settings = register(server, variant)
    try:
        top1 = served_top1(server, variant.model_name, photos)
        log(f"({variant.key}) {settings['workers']} worker(s), batch "
            f"{settings['batch_size']}, delay {settings['max_batch_delay_ms']} ms: {concurrency} "
            f"clients, warming up {warmup_s:g} s, then measuring {seconds:g} s")
        key = server.client.key("inference")
        headers = {"Content-Type": "application/octet-stream",
                   **({"Authorization": f"Bearer {key}"} if key else {})}
        timeout_s = (settings.get("response_timeout_s") or 120) + 30
        load = LoadGenerator(f"{server.inference_url}/predictions/{variant.model_name}", headers,
                             list(photos.values()), concurrency, timeout_s,
                             ForeignCpu([server.pid()]))
        result = load.run(warmup_s, seconds, variant.key)
    finally:
        unregister(server, variant.model_name)
    result.settings = {**settings, "concurrency": concurrency, "model_name": variant.model_name}
    result.top1 = top1
    return result


def unregister(server: TorchServe, model_name: str) -> None:
    """Frees the variant's workers so that the next one has the cores to itself."""
    try:
        server.client.unregister(model_name)
    except Exception as exc:  # a leftover model only costs memory; the run goes on
        log(f"    could not unregister {model_name}: {exc}")


def run_served(entry: ModelEntry, keys: Sequence[str], photos: Dict[str, bytes], args,
               workdir: str) -> List[Measurement]:
    store = prepare_store(entry, keys, workdir)
    server = TorchServe.from_catalog(os.path.join(workdir, "server"), load_catalog(), store)
    results = []
    try:
        log(f"starting TorchServe (inference {server.inference_url}, logs in {server.home}/logs)")
        server.start()
        for variant in served_variants(entry, keys):
            results.append(measure_served(server, variant, photos, args.concurrency,
                                          args.warmup, args.seconds))
            log(f"({variant.key}) {results[-1].throughput:.1f} img/s "
                f"(other programs used {results[-1].foreign_cpu_cores:.2f} cores meanwhile)")
    except Exception:
        log(f"failed; server log tail:\n{server.log_tail()}")
        raise
    finally:
        log("stopping TorchServe")
        server.stop()
    return results


# -- report --------------------------------------------------------------------------------------
def ratios(results: Dict[str, Measurement]) -> List[dict]:
    out = []
    for (num, den), target in RATIO_TARGETS.items():
        value = None
        if num in results and den in results and results[den].throughput > 0:
            value = results[num].throughput / results[den].throughput
        out.append({"ratio": f"({num})/({den})", "value": _round(value, 3), "target": target,
                    "met": None if value is None or target is None else value >= target})
    return out


def markdown(results: Dict[str, Measurement], ratio_rows: List[dict], header: dict) -> str:
    lines = [f"ResNet-18, {header['seconds']:g} s per variant after {header['warmup']:g} s warm-up, "
             f"concurrency {header['concurrency']}, {header['cpu_count']} CPU cores, "
             f"{header['started']}", "",
             "| variant | throughput (img/s) | p50 ms | p99 ms | errors |",
             "|---|---:|---:|---:|---:|"]
    for key in ALL_VARIANTS:
        if key in results:
            r = results[key]
            errors = sum(r.errors.values())
            detail = f" ({', '.join(f'{k}: {v}' for k, v in r.errors.items())})" if errors else ""
            lines.append(f"| {TITLES[key]} | {r.throughput:.1f} | {_fmt(r.percentile(50))} | "
                         f"{_fmt(r.percentile(99))} | {errors}{detail} |")
    lines.append("")
    for row in ratio_rows:
        value = "n/a (variant not run)" if row["value"] is None else f"{row['value']:.2f}"
        target = ""
        if row["target"] is not None:
            verdict = "" if row["met"] is None else (" - met" if row["met"] else " - NOT met")
            target = f"  (target >= {row['target']}{verdict})"
        lines.append(f"- throughput {row['ratio']}: {value}{target}")
    lines.append("")
    lines += contention_notes(results)
    if "a" in results:
        lines.append(f"(a) latency is per batch of {results['a'].settings['batch_size']}; "
                     "served latencies are per request, measured by the client.")
    for key in ALL_VARIANTS:
        if key in results:
            lines.append(f"- {key}: settings {results[key].settings}; top-1 {results[key].top1}")
    return "\n".join(lines) + "\n"


def contention_notes(results: Dict[str, Measurement]) -> List[str]:
    measured = {k: r.foreign_cpu_cores for k, r in results.items() if r.foreign_cpu_cores is not None}
    if not measured:
        return []
    listed = ", ".join(f"({k}) {v:.2f}" for k, v in sorted(measured.items()))
    lines = [f"CPU cores used by other programs while measuring: {listed}."]
    noisy = sorted(k for k, v in measured.items() if v > FOREIGN_CPU_WARNING)
    if noisy:
        lines.append(f"WARNING: other programs competed for the CPU during "
                     f"{', '.join(f'({k})' for k in noisy)}; rerun on a quiet machine before "
                     f"trusting these numbers.")
    return lines + [""]


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def write_results(results: Dict[str, Measurement], ratio_rows: List[dict], header: dict,
                  table: str) -> None:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, "latest.json"), "w", encoding="utf-8") as f:
        json.dump({**header, "variants": {k: results[k].summary() for k in ALL_VARIANTS if k in results},
                   "ratios": ratio_rows}, f, indent=2)
    with open(os.path.join(RESULTS_DIR, "latest.md"), "w", encoding="utf-8") as f:
        f.write(table)


# -- main ----------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per variant")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each")
    parser.add_argument("--concurrency", type=int, default=16, help="client threads (served variants)")
    parser.add_argument("--only", default=",".join(ALL_VARIANTS),
                        help="comma-separated subset of a,b,c,d")
    args = parser.parse_args(argv)
    args.only = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = sorted(set(args.only) - set(ALL_VARIANTS))
    if unknown or not args.only:
        parser.error(f"--only takes a comma-separated subset of {','.join(ALL_VARIANTS)}")
    if args.seconds <= 0 or args.warmup < 0 or args.concurrency < 1:
        parser.error("--seconds must be > 0, --warmup >= 0 and --concurrency >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    entry = load_catalog().model(MODEL)
    if not os.path.isfile(os.path.join(MODEL_STORE, entry.mar_name)):
        log(f"model_store/{entry.mar_name} is missing: run `make build` first")
        return 1
    photos = load_photos()
    header = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "seconds": args.seconds, "warmup": args.warmup, "concurrency": args.concurrency,
              "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "python": platform.python_version(), "photos": list(photos)}
    results: Dict[str, Measurement] = {}
    workdir = tempfile.mkdtemp(prefix="ts-bench-")
    keep_workdir = True
    try:
        if "a" in args.only:
            results["a"] = measure_in_process(entry, photos, args.warmup, args.seconds, workdir)
            log(f"(a) {results['a'].throughput:.1f} img/s (other programs used "
                f"{results['a'].foreign_cpu_cores:.2f} cores meanwhile)")
        served = [k for k in args.only if k != "a"]
        if served:
            for result in run_served(entry, served, photos, args, workdir):
                results[result.variant] = result
        keep_workdir = False
    finally:
        if keep_workdir:
            log(f"kept {workdir} (server logs, archives) for a look")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    header["duration_s"] = round(time.perf_counter() - started, 1)
    ratio_rows = ratios(results)
    table = markdown(results, ratio_rows, header)
    write_results(results, ratio_rows, header, table)
    print("\n" + table, flush=True)
    log(f"done in {header['duration_s']:.0f} s; results in "
        f"{os.path.relpath(RESULTS_DIR, ROOT)}/latest.json and latest.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
