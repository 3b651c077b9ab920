"""`make bench`: EfficientNet-Lite0 in-process vs served by this project vs TorchServe's stock handler, then
every archive variant of every catalog model (image: EfficientNet-Lite0 and digits; text: MiniLM; tabular:
diabetes), in-process and served, side by side.

Foundation table: the same weights and the same two photographs for all of
  (a) in-process: the handler's own stages (wire -> vision -> runtime -> classification) in this process,
      in batches of the catalog's batchSize, with the served worker's thread budget;
  (b) this project's efficientnet_lite0.mar on a real TorchServe, with the catalog's serving settings;
  (c) TorchServe's stock image_classifier handler with TorchServe's defaults (batch size 1,
      one worker per CPU core), given the fp32 state_dict from efficientnet_lite0.mar (or, where that
      archive holds a transformed model, from the eager variant's archive);
  (d) the same stock archive with (b)'s batching and workers.
Variants tables: one per catalog model, one row per archive (fp32 and each variant), each
measured in-process as (a) is, through the runtime its own model-config.yaml names (eager,
autocast, TorchScript, int8, ONNX Runtime), and served as (b) is, with the catalog's serving
settings for that entry; plus the fidelity figures the build measured (handler.meta). Inputs are
real: the photographs (EfficientNet-Lite0), held-out digits, the fidelity sentences (MiniLM), held-out
diabetes rows. One request carries one item (image, text or row) so that TorchServe batches
them; a row's items/s is also its requests/s. The fp32 EfficientNet-Lite0 row is (a) and (b) themselves:
the same archive, measured once.

All in-process rows run first, before the server starts, so that they have the cores to themselves.
Then one TorchServe serves the served rows one after the other: each is registered, its answers
to every input checked one request at a time (Python), then loaded by wrk (scripts/loadgen.py: C,
one event-loop thread, --concurrency keep-alive connections, every input in turn, the token in an
Authorization header) for --warmup seconds, unreported, and --seconds measured; then unregistered.
Only 2xx answers count; the rest are reported as errors. Beside each served row the bench reports
the CPU the client itself used (wrk's user + system seconds over its wall seconds, in cores) and
what other programs used. Without wrk the served rows fail, naming the command that installs it
(scripts/ensure_loadgen.sh); `--client python` measures them with the earlier client (Python
threads in this process, competing with the server for the cores) for a comparison.
A row that fails (an archive that does not load, say) is reported as failed and the others still run.

The first served row is the echo ceiling: echo.mar, built here from scripts/echo_handler.py (a
handler that answers "ok", no model), served with the light models' batching (batch 8, 5 ms, one
worker) and the same client and concurrency: TorchServe's own per-request ceiling on this machine.
Every variants table then shows each served row as a fraction of min(echo ceiling, its in-process
rate), the most it could reach.

    python -m scripts.bench [--seconds 15] [--in-process-seconds 10] [--concurrency 16] [--warmup 2]
                            [--families image,text,tabular] [--only a,b,c,d]
                            [--variants fp32,bf16,int8,torchscript,onnx] [--skip-variants]
                            [--client wrk|python] [--skip-echo] [--models digits,minilm,...]

--families picks the tables: the foundation table and EfficientNet-Lite0/digits are the image family, so
`--families text,tabular` measures only the text and tabular rows.

Results: tables on stdout, build/bench/latest.json and build/bench/latest.md.
"""
import argparse
import contextlib
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
from typing import Callable, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from handler_kit import runtime  # noqa: E402
from handler_kit.image_config import parse_image_classifier  # noqa: E402

from models import sample_data, sentences  # noqa: E402
from models.families import FAMILIES as FAMILY_DECLARATIONS, FOUNDATION_MODEL, resolve, samples_of  # noqa: E402
from scripts.catalog import FAMILIES, MODEL_STORE, Catalog, ModelEntry, load_catalog  # noqa: E402
from scripts import loadgen  # noqa: E402
from scripts.in_process import importable, load_service  # noqa: E402  (a worker's model folder)
from scripts.ts_server import TorchServe, archiver_command  # noqa: E402

MODEL = FOUNDATION_MODEL
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
# The stock handler's model file must define exactly one class, which its loader instantiates
# without arguments before loading the state_dict: this one returns the catalog's own network
# (handler.model.module/factory/kwargs), so (c) and (d) serve the same network as (b).
STOCK_MODEL_FILE = '''"""The catalog model's network for TorchServe's stock handler (generated by scripts/bench.py)."""
import {module} as source


class ImageClassifier:
    def __new__(cls):
        return source.{factory}(**{kwargs!r})
'''
IN_PROCESS, SERVED = "in-process", "served"
# What one item of each family is called in the tables (one request carries one item), and how
# clients send it (the worker decodes the body by this, see worker_value): models/families.py.
ITEM_UNITS = {name: f.item_unit for name, f in FAMILY_DECLARATIONS.items()}
ITEM_NOUNS = {name: f.item_noun for name, f in FAMILY_DECLARATIONS.items()}
CONTENT_TYPES = {name: f.content_type for name, f in FAMILY_DECLARATIONS.items()}
# The fp32 EfficientNet-Lite0 row of the variants table is the foundation's (a) and (b): same archive,
# same pipeline, same serving settings. It is measured once and shown in both tables.
FOUNDATION_ALIAS = {IN_PROCESS: "a", SERVED: "b"}
# The echo ceiling: a handler that answers a constant (scripts/echo_handler.py), no model file,
# registered with the light models' batching (digits and diabetes in the catalog: batch 8, 5 ms,
# one worker): what TorchServe itself can answer per second on this machine.
ECHO_KEY = "echo ceiling"
ECHO_MODEL = "echo"
ECHO_HANDLER = os.path.join(ROOT, "scripts", "echo_handler.py")
ECHO_REGISTRATION = {"batch_size": 8, "max_batch_delay": 5, "initial_workers": 1, "response_timeout": 30}
ECHO_BODIES = 8  # the first held-out diabetes rows: the smallest real request bodies of the bench
CLIENTS = {"wrk": "wrk (C, 1 event-loop thread, keep-alive connections)",
           "python": "Python threads in the bench's process (one requests session each)"}


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


# -- results -------------------------------------------------------------------------------------
@dataclass
class Measurement:
    variant: str           # a-d for the foundation table, "<archive stem> <mode>" for variant rows
    items: int = 0         # images, texts or rows answered (one per request)
    seconds: float = 0.0
    latencies_ms: List[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    latency_unit: str = "request"
    unit: str = "img"      # what an item is in the tables: img, texts, rows
    settings: dict = field(default_factory=dict)
    answers: Dict[str, str] = field(default_factory=dict)  # sample name -> answer_summary
    first_error: Optional[str] = None
    foreign_cpu_cores: Optional[float] = None  # CPU used by other programs while measuring
    failure: Optional[str] = None               # the row could not be measured at all
    client: Optional[str] = None                # served rows: the load generator (CLIENTS)
    client_cpu_cores: Optional[float] = None    # ... and the CPU it used while measuring
    # Percentiles the load generator computed itself ("p50" -> ms), where it reports no latencies
    latency_percentiles_ms: Dict[str, float] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> Optional[float]:
        if f"p{q:g}" in self.latency_percentiles_ms:
            return self.latency_percentiles_ms[f"p{q:g}"]
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None

    def summary(self) -> dict:
        throughput = round(self.throughput, 2)
        # One item per request, so requests/s is items/s.
        out = {"title": TITLES.get(self.variant, self.variant), "unit": self.unit,
               "throughput_items_s": throughput, "requests_s": throughput,
               "p50_ms": _round(self.percentile(50)), "p99_ms": _round(self.percentile(99)),
               "latency_of": self.latency_unit, "items_ok": self.items,
               "measured_s": round(self.seconds, 3), "errors": sum(self.errors.values()),
               "errors_by_kind": {str(k): v for k, v in self.errors.items()},
               "first_error": self.first_error, "foreign_cpu_cores": _round(self.foreign_cpu_cores, 2),
               "failure": self.failure, "settings": self.settings, "answers": self.answers}
        if self.client:
            out.update(client=self.client, client_cpu_cores=_round(self.client_cpu_cores, 3))
        if self.unit == ITEM_UNITS["image"]:
            # The image rows' names from before the text and tabular rows (scripts/kserve.py reads
            # throughput_img_s).
            out.update(throughput_img_s=throughput, images_ok=self.items, top1=self.answers)
        return out


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


def answer_summary(body) -> str:
    """One answer, short enough to compare in-process with served: an image classifier's top-1
    label, a text embedding's size and first values, a tabular regressor's predictions."""
    if isinstance(body, dict) and isinstance(body.get("embeddings"), list) and body["embeddings"]:
        vector = body["embeddings"][0]
        return f"{len(vector)}-d [{', '.join(f'{v:.4f}' for v in vector[:3])}, ...]"
    if isinstance(body, dict) and isinstance(body.get("predictions"), list):
        return ", ".join(f"{v:.2f}" for v in body["predictions"])
    if isinstance(body, (str, bytes, bytearray)):
        # An answer still in its wire form (a handler may hand TorchServe JSON text itself), or
        # the echo handler's constant, which is not JSON.
        try:
            parsed = json.loads(body)
        except ValueError:
            return (body.decode("utf-8", "replace") if isinstance(body, (bytes, bytearray)) else body)[:60]
        return parsed[:60] if isinstance(parsed, str) else answer_summary(parsed)
    return top1_label(body)


def attempt(key: str, measure: Callable[[], Measurement], unit: str = "img") -> Measurement:
    """One row's measurement. A row that raises is reported as failed instead of ending the run:
    the rows already measured (minutes of work) and the rows after it are still worth having."""
    try:
        return measure()
    except Exception as exc:  # noqa: BLE001 - any failure of one row is that row's result
        reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        log(f"({key}) FAILED: {reason}")
        return Measurement(key, failure=reason, unit=unit)


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

    def cores(self, client_cpu_s: float = 0.0) -> float:
        """``client_cpu_s``: CPU seconds of a load generator that has exited since start(), ours too."""
        wall, busy, ours = self._begin
        elapsed = time.perf_counter() - wall
        foreign = (self._busy_s() - busy) - (self._ours_s() - ours) - client_cpu_s
        return max(0.0, foreign / elapsed) if elapsed > 0 else 0.0


# -- inputs --------------------------------------------------------------------------------------
def load_photos() -> Dict[str, bytes]:
    return dict(zip(sample_data.PHOTO_NAMES, sample_data.photo_bytes()))


def load_digits(count: int = 8) -> Dict[str, bytes]:
    """Held-out digits as the 8-bit grayscale PNGs a client sends (named as build/samples names
    them); never the training images, and as many as a batch holds, so batches are all distinct."""
    _, _, images, labels = sample_data.digits_split()
    return {f"digit_{label}_{n}.png": sample_data.png_bytes(pixels)
            for n, (pixels, label) in enumerate(zip(images[:count], labels[:count]))}


def load_sentences() -> Dict[str, bytes]:
    """The fidelity gate's real sentences (short, of varied length), one UTF-8 text body each."""
    return {f"sentence_{n}": text.encode("utf-8") for n, text in enumerate(sentences.fidelity_sentences())}


def load_diabetes_rows() -> Dict[str, bytes]:
    """Held-out diabetes rows, each a JSON list of the 10 features in the data set's own units."""
    from models.tabular import diabetes_split
    _, _, rows, _, _ = diabetes_split()
    # str() of a float32 is its shortest round-trip decimal (32.1, not 32.099998474121094).
    return {f"row_{n}": json.dumps([float(str(v)) for v in row]).encode("utf-8")
            for n, row in enumerate(rows)}


def _inputs(entry: ModelEntry) -> Callable[[], Dict[str, bytes]]:
    return lambda: resolve(samples_of(entry).bench)()


# What clients send each catalog model (its family's samples, models/families.py); a model
# without an entry here gets no table.
INPUTS = {m.name: _inputs(m) for m in load_catalog().models if m.is_default and m.variant == "fp32"}


def worker_value(body: bytes, content_type: str):
    """The body as TorchServe's worker hands it to the handler (ts/protocol/otf_message_handler.py,
    _retrieve_input_data): application/json parsed, text/* decoded, anything else raw bytes."""
    if content_type == "application/json":
        return json.loads(body.decode("utf-8"))
    if content_type.startswith("text"):
        return body.decode("utf-8")
    return body


def extract_archive(mar_path: str, out_dir: str, names: Optional[Sequence[str]] = None) -> str:
    """``names`` from the archive (all of it when None) into out_dir."""
    with zipfile.ZipFile(mar_path) as archive:
        archive.extractall(out_dir, members=names)
    return out_dir


def read_model_config(mar_path: str) -> dict:
    """The archive's model-config.yaml: what the worker is configured with, fidelity included."""
    with zipfile.ZipFile(mar_path) as archive:
        return yaml.safe_load(archive.read("model-config.yaml"))


# -- in-process rows -----------------------------------------------------------------------------
class InProcessPipeline:
    """The archive's own handler, loaded by TorchServe's model loader and called stage by stage
    (preprocess, inference, postprocess) on request bodies decoded as the worker decodes them: what
    the worker runs, without HTTP, the frontend's batching or the worker's socket."""

    def __init__(self, archive_dir: str, model_config: dict):
        with importable(archive_dir):
            # A worker gets a GPU from TorchServe whenever one exists; mirror that.
            service = load_service(archive_dir, batch_size=model_config.get("batchSize", 1),
                                   gpu_id=0 if torch.cuda.is_available() else None)
        self.handler = service._entry_point.__self__
        self.device = self.handler.device
        self.threads = torch.get_num_threads()  # the handler applied its thread budget

    def settings(self) -> dict:
        """How the handler runs the model, as it reports itself to the management API (without
        its meta, which is the build's), plus the thread count and, for images, the memory layout."""
        described = {k: v for k, v in self.handler.describe_handle().items() if k != "meta"}
        layout = getattr(self.handler, "channels_last", None)
        return {"threads": self.threads, "device": str(self.device), **described,
                **({} if layout is None else {"channels_last": layout})}

    def __call__(self, values: Sequence) -> list:
        handler = self.handler
        answers = handler.postprocess(handler.inference(handler.preprocess([{"body": v} for v in values])))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return answers


def measure_in_process(key: str, entry: ModelEntry, bodies: Dict[str, bytes], warmup_s: float,
                       seconds: float, workdir: str) -> Measurement:
    mar_path = os.path.join(MODEL_STORE, entry.mar_name)
    archive_dir = extract_archive(mar_path, os.path.join(workdir, IN_PROCESS, archive_stem(entry)))
    pipeline = InProcessPipeline(archive_dir, read_model_config(mar_path))
    batch_size = entry.serving["batchSize"]
    content_type = CONTENT_TYPES[entry.family]
    values = {name: worker_value(body, content_type) for name, body in bodies.items()}
    samples = list(values.values())
    batch = [samples[i % len(samples)] for i in range(batch_size)]
    unit = ITEM_UNITS[entry.family]
    result = Measurement(key, latency_unit=f"batch of {batch_size}", unit=unit,
                         settings={"archive": entry.mar_name, "batch_size": batch_size, **pipeline.settings()})
    result.answers = {name: answer_summary(pipeline([value])[0]) for name, value in values.items()}
    log(f"({key}) batch {batch_size}, {pipeline.threads} thread(s) on {pipeline.device}: "
        f"warming up {warmup_s:g} s, then measuring {seconds:g} s")
    run_batches(pipeline, batch, warmup_s)
    foreign = ForeignCpu()
    foreign.start()
    # Duration-bounded, not a fixed count: a slow variant (bf16 autocast without native bf16
    # instructions runs at a few img/s) takes as long as a fast one.
    result.latencies_ms, result.seconds = run_batches(pipeline, batch, seconds)
    result.foreign_cpu_cores = foreign.cores()
    result.items = len(result.latencies_ms) * batch_size
    del pipeline
    gc.collect()  # give the model's memory back before the next row
    shutil.rmtree(archive_dir, ignore_errors=True)
    log(f"({key}) {result.throughput:.1f} {unit}/s (other programs used "
        f"{result.foreign_cpu_cores:.2f} cores meanwhile)")
    return result


def run_batches(pipeline: InProcessPipeline, batch: list, seconds: float):
    """Back-to-back batches for ``seconds`` (at least one): per-batch ms and the elapsed time."""
    latencies = []
    started = time.perf_counter()
    while not latencies or time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        pipeline(batch)
        latencies.append((time.perf_counter() - t0) * 1000)
    return latencies, time.perf_counter() - started


# -- served rows ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServedVariant:
    key: str
    model_name: str
    archive: str           # file name in the server's model store
    registration: dict     # management API parameters beyond url and model_name
    inputs: Dict[str, bytes] = field(compare=False, repr=False, default_factory=dict)
    content_type: str = CONTENT_TYPES["image"]
    unit: str = ITEM_UNITS["image"]


def catalog_registration(entry: ModelEntry) -> dict:
    """Management API parameters beyond url and model_name: the catalog's serving settings."""
    return {k: v for k, v in entry.registration().items() if k != "model_name"}


def foundation_served(entry: ModelEntry, keys: Sequence[str], photos: Dict[str, bytes]) -> List[ServedVariant]:
    stock_mar = f"{stock_archive(entry)}.mar"
    variants = [
        ServedVariant("b", entry.name, entry.mar_name, catalog_registration(entry), photos),
        # Without initial_workers a registered model gets no worker at all; TorchServe's own
        # default (default_workers_per_model) is one worker per CPU core on a CPU host.
        ServedVariant("c", f"{entry.name}_stock_default", stock_mar,
                      {"initial_workers": os.cpu_count() or 1}, photos),
        ServedVariant("d", f"{entry.name}_stock_batched", stock_mar, catalog_registration(entry), photos),
    ]
    return [v for v in variants if v.key in keys]


def state_dict_archive(catalog: Catalog, name: str) -> tuple:
    """(archive path, its parsed handler config) of the first of the model's archives, in catalog
    order, that holds the plain fp32 state_dict the stock handler needs: the base archive, or its
    eager variant where the base is served transformed (TorchScript, say). Decided from what the
    archives hold, not from the catalog, so that a catalog edited before `make build` still works."""
    for entry in catalog.models:
        path = os.path.join(MODEL_STORE, entry.mar_name)
        if entry.base != name or not os.path.isfile(path):
            continue
        cfg = parse_image_classifier(read_model_config(path)["handler"])
        if cfg.model.format == "state_dict" and cfg.runtime.dtype == "float32":
            return path, cfg
    raise FileNotFoundError(f"no archive of {name} in model_store/ holds an fp32 state_dict "
                            f"for the stock handler; run `make build`")


def stock_archive(entry: ModelEntry) -> str:
    """File stem of the stock-handler archive of a catalog model."""
    return f"{entry.name}_stock"


def build_stock_archive(entry: ModelEntry, catalog: Catalog, store: str, workdir: str) -> str:
    """The same weights packaged the way TorchServe's examples do: model file + state_dict +
    index_to_name.json, served by the built-in ``image_classifier`` handler."""
    mar_path, cfg = state_dict_archive(catalog, entry.name)
    log(f"building the stock-handler archive from {os.path.basename(mar_path)}'s state_dict")
    module_file = f"{cfg.model.module}.py"  # a model file of the archive, e.g. efficientnet_lite.py
    with zipfile.ZipFile(mar_path) as archive:
        bundled = module_file in archive.namelist()
    src = extract_archive(mar_path, os.path.join(workdir, "stock"),
                          (cfg.model.weights, cfg.labels, *([module_file] if bundled else [])))
    model_file = os.path.join(src, f"stock_{entry.name}.py")
    with open(model_file, "w", encoding="utf-8") as f:
        f.write(STOCK_MODEL_FILE.format(module=cfg.model.module, factory=cfg.model.factory,
                                        kwargs=dict(cfg.model.kwargs)))
    with open(os.path.join(src, cfg.labels), encoding="utf-8") as f:
        labels = json.load(f)
    index_to_name = os.path.join(src, "index_to_name.json")
    with open(index_to_name, "w", encoding="utf-8") as f:
        json.dump({str(i): label for i, label in enumerate(labels)}, f)
    archiver = archiver_command()
    os.makedirs(store, exist_ok=True)
    subprocess.run([*archiver, "--model-name", stock_archive(entry), "--version", entry.version,
                    "--model-file", model_file, "--serialized-file", os.path.join(src, cfg.model.weights),
                    "--handler", "image_classifier",
                    "--extra-files", ",".join([index_to_name, *([os.path.join(src, module_file)] if bundled else [])]),
                    "--export-path", store, "--force"], check=True, cwd=src)
    return os.path.join(store, f"{stock_archive(entry)}.mar")


def echo_variant(inputs: Optional[Dict[str, bytes]] = None) -> ServedVariant:
    """The echo ceiling's served row: echo.mar with the light models' batching, sent the smallest
    real bodies of the bench (held-out diabetes rows as JSON; the handler ignores them)."""
    if inputs is None:
        inputs = dict(list(load_diabetes_rows().items())[:ECHO_BODIES])
    return ServedVariant(ECHO_KEY, ECHO_MODEL, f"{ECHO_MODEL}.mar", dict(ECHO_REGISTRATION), inputs,
                         CONTENT_TYPES["tabular"], "req")


def build_echo_archive(store: str, workdir: str) -> str:
    """echo.mar: scripts/echo_handler.py alone (no model file, no weights), built into the bench's
    own store with torch-model-archiver."""
    src = os.path.join(workdir, "echo")
    os.makedirs(src, exist_ok=True)
    handler = shutil.copy(ECHO_HANDLER, os.path.join(src, os.path.basename(ECHO_HANDLER)))
    archiver = archiver_command()
    os.makedirs(store, exist_ok=True)
    subprocess.run([*archiver, "--model-name", ECHO_MODEL, "--version", "1.0", "--handler", handler,
                    "--export-path", store, "--force"], check=True, cwd=src)
    return os.path.join(store, f"{ECHO_MODEL}.mar")


def prepare_store(entry: ModelEntry, catalog: Catalog, plan: Sequence[ServedVariant],
                  workdir: str) -> str:
    """A store of its own (links to model_store/ archives), so that the stock and echo archives
    never land in model_store/."""
    store = os.path.join(workdir, "store")
    os.makedirs(store)
    stock_mar, echo_mar = f"{stock_archive(entry)}.mar", f"{ECHO_MODEL}.mar"
    for archive in sorted({v.archive for v in plan} - {stock_mar, echo_mar}):
        os.symlink(os.path.join(MODEL_STORE, archive), os.path.join(store, archive))
    if any(v.archive == stock_mar for v in plan):
        build_stock_archive(entry, catalog, store, workdir)
    if any(v.archive == echo_mar for v in plan):
        build_echo_archive(store, workdir)
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


def served_answers(server: TorchServe, variant: ServedVariant) -> Dict[str, str]:
    """Every input's answer, one request at a time (Python): the per-request check that the
    served answers are the in-process ones. Load comes from the load generator afterwards."""
    out = {}
    for name, body in variant.inputs.items():
        response = server.client.predict_raw(variant.model_name, body, content_type=variant.content_type)
        if response.status_code != 200:
            out[name] = f"HTTP {response.status_code}: {response.text[:80]}"
            continue
        try:
            answer = response.json()
        except ValueError:
            answer = response.text
        out[name] = answer_summary(answer)
    return out


class LoadGenerator:
    """The earlier client, kept for `--client python` comparisons only: ``concurrency`` threads in
    this process, each with its own keep-alive session, posting request bodies (one image, text or
    row each) back to back. Answers completed inside [warm-up end, end] are the measurement. On a
    2-core machine its threads compete with the server for the cores (the client CPU it reports
    is this process's)."""

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
        n = index  # threads start on different inputs so that all of them are always in flight
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
        own = psutil.Process()
        cpu_begin, wall_begin = own.cpu_times(), time.perf_counter()
        self._report_progress(seconds)
        foreign_cores = self.foreign.cores()
        cpu_end = own.cpu_times()
        client_cores = loadgen.client_cores(cpu_end.user - cpu_begin.user, cpu_end.system - cpu_begin.system,
                                            time.perf_counter() - wall_begin)
        for thread in threads:
            thread.join()
        result = self._measurement(variant)
        result.foreign_cpu_cores, result.client_cpu_cores = foreign_cores, client_cores
        result.client = CLIENTS["python"]
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
        result.items = len(result.latencies_ms)  # one item per request
        result.errors = Counter(status for _, status in inside if status != 200)
        return result


def measure_with_loadgen(url: str, variant: ServedVariant, token: Optional[str], concurrency: int,
                         warmup_s: float, seconds: float, timeout_s: float, foreign: ForeignCpu,
                         workdir: str) -> Measurement:
    """wrk for ``warmup_s`` (unreported), then for ``seconds``: its figures, its own CPU use, and
    what the other programs used meanwhile (the server's processes, this one and wrk excluded)."""
    bodies = list(variant.inputs.values())
    if warmup_s > 0:
        loadgen.run(url, bodies, variant.content_type, token, concurrency, warmup_s, timeout_s, workdir)
    foreign.start()
    load = loadgen.run(url, bodies, variant.content_type, token, concurrency, seconds, timeout_s, workdir)
    result = loadgen_measurement(variant.key, load)
    result.foreign_cpu_cores = foreign.cores(client_cpu_s=load.client_cpu_s or 0.0)
    return result


def loadgen_measurement(key: str, load: "loadgen.LoadResult") -> Measurement:
    """A served row from wrk's figures: items are the 2xx answers (one per request), errors every
    other status and every socket error; p50/p99 are wrk's, over the answers it completed."""
    return Measurement(key, items=load.ok, seconds=load.seconds, errors=load.errors,
                       first_error=load.first_error, latency_percentiles_ms=dict(load.latency_ms),
                       client=CLIENTS["wrk"], client_cpu_cores=load.client_cores)


def measure_served(server: TorchServe, variant: ServedVariant, concurrency: int, warmup_s: float,
                   seconds: float, client: str = "wrk", workdir: Optional[str] = None) -> Measurement:
    if client == "wrk":
        loadgen.find_wrk()  # before registering: a missing tool fails the row at once, saying why
    settings = register(server, variant)
    try:
        answers = served_answers(server, variant)
        log(f"({variant.key}) {settings['workers']} worker(s), batch "
            f"{settings['batch_size']}, delay {settings['max_batch_delay_ms']} ms: {concurrency} "
            f"connections ({client}), warming up {warmup_s:g} s, then measuring {seconds:g} s")
        key = server.client.key("inference")
        timeout_s = (settings.get("response_timeout_s") or 120) + 30
        url = f"{server.inference_url}/predictions/{variant.model_name}"
        foreign = ForeignCpu([server.pid()])
        if client == "wrk":
            result = measure_with_loadgen(url, variant, key, concurrency, warmup_s, seconds, timeout_s,
                                          foreign, workdir or tempfile.gettempdir())
        else:
            headers = {"Content-Type": variant.content_type,
                       **({"Authorization": f"Bearer {key}"} if key else {})}
            load = LoadGenerator(url, headers, list(variant.inputs.values()), concurrency, timeout_s,
                                 foreign)
            result = load.run(warmup_s, seconds, variant.key)
    finally:
        unregister(server, variant.model_name)
    result.settings = {**settings, "archive": variant.archive, "concurrency": concurrency,
                       "model_name": variant.model_name}
    result.answers, result.unit = answers, variant.unit
    log(f"({variant.key}) {result.throughput:.1f} {variant.unit}/s, p50 {_fmt(result.percentile(50))} ms, "
        f"{sum(result.errors.values())} errors (client used {_fmt(result.client_cpu_cores, 2)} cores, "
        f"other programs {result.foreign_cpu_cores:.2f})")
    return result


def unregister(server: TorchServe, model_name: str) -> None:
    """Frees the variant's workers so that the next one has the cores (and memory) to itself."""
    try:
        server.client.unregister(model_name)
    except Exception as exc:  # a leftover model only costs memory; the run goes on
        log(f"    could not unregister {model_name}: {exc}")


def run_served(entry: ModelEntry, catalog: Catalog, plan: Sequence[ServedVariant], args,
               workdir: str) -> List[Measurement]:
    """Every served row on one TorchServe, one model registered at a time."""
    client = getattr(args, "client", "wrk")
    try:
        if client == "wrk":
            loadgen.find_wrk()
    except loadgen.LoadgenMissing as exc:
        # No silent fallback to a client that would measure something else: every served row fails.
        log(f"!!! {exc}")
        log("!!! every served row fails; `--client python` measures them with the slower Python client")
        return [Measurement(v.key, failure=str(exc), unit=v.unit) for v in plan]
    store = prepare_store(entry, catalog, plan, workdir)
    server = TorchServe.from_catalog(os.path.join(workdir, "server"), catalog, store)
    results = []
    try:
        log(f"starting TorchServe (inference {server.inference_url}, logs in {server.home}/logs)")
        server.start()
        for variant in plan:
            result = attempt(variant.key, lambda: measure_served(server, variant, args.concurrency,
                                                                 args.warmup, args.seconds, client,
                                                                 workdir), variant.unit)
            if result.failure:
                log(f"server log tail:\n{server.log_tail()}")
            results.append(result)
    except Exception:
        log(f"failed; server log tail:\n{server.log_tail()}")
        raise
    finally:
        log("stopping TorchServe")
        server.stop()
    return results


# -- what to measure -----------------------------------------------------------------------------
@dataclass(frozen=True)
class VariantRow:
    entry: ModelEntry
    in_process_key: str
    served_key: str


@dataclass(frozen=True)
class VariantTable:
    base: ModelEntry             # the archive the variants are built from: speeds compare with it
    rows: tuple

    @property
    def metric(self) -> str:     # what the build's fidelity gate measured: agreement | accuracy | ...
        return self.base.fidelity["metric"]

    @property
    def unit(self) -> str:
        return ITEM_UNITS[self.base.family]


def archive_stem(entry: ModelEntry) -> str:
    """digits, digits_int8, digits_v2.0: unique per archive, where a model's name is not."""
    return entry.mar_name[:-len(".mar")]


def row_key(entry: ModelEntry, mode: str, foundation: Sequence[str]) -> str:
    alias = FOUNDATION_ALIAS[mode]
    if entry.name == MODEL and alias in foundation:
        return alias
    return f"{archive_stem(entry)} {mode}"


def tabled_models(catalog: Catalog, families: Sequence[str]) -> List[ModelEntry]:
    """The archive each variants table compares with (model_store/<name>.mar, which the variants
    are built from), for the catalog models of ``families`` that the benchmark has inputs for."""
    bases = []
    for name in dict.fromkeys(e.base for e in catalog.models):
        base = catalog.archive(name)
        if base.family not in families:
            continue
        if name not in INPUTS:
            log(f"no benchmark inputs for {name} (INPUTS in scripts/bench.py): no table for it")
            continue
        bases.append(base)
    return bases


def plan_variant_tables(catalog: Catalog, variants: Sequence[str], foundation: Sequence[str],
                        families: Sequence[str]) -> List[VariantTable]:
    """One table per catalog model of ``families``, rows in catalog order (fp32 first). A model's
    other versions (digits 2.0) are not variants of it and get no row."""
    tables = []
    for base in tabled_models(catalog, families):
        rows = tuple(VariantRow(e, row_key(e, IN_PROCESS, foundation), row_key(e, SERVED, foundation))
                     for e in catalog.models
                     if e.base == base.name and e.version == base.version and e.variant in variants)
        if rows:
            tables.append(VariantTable(base, rows))
    return tables


def in_process_plan(entry: ModelEntry, foundation: Sequence[str],
                    tables: Sequence[VariantTable]) -> List[tuple]:
    """(key, entry) of each in-process row to measure; the foundation's (a) first."""
    plan = [("a", entry)] if "a" in foundation else []
    plan += [(row.in_process_key, row.entry) for table in tables for row in table.rows
             if row.in_process_key not in ALL_VARIANTS]
    return plan


def served_plan(entry: ModelEntry, foundation: Sequence[str], tables: Sequence[VariantTable],
                inputs: Dict[str, Dict[str, bytes]]) -> List[ServedVariant]:
    """Each served row to measure, the foundation's (b), (c), (d) first."""
    plan = foundation_served(entry, foundation, inputs[entry.name]) if foundation else []
    plan += [ServedVariant(row.served_key, row.entry.name, row.entry.mar_name,
                           catalog_registration(row.entry), inputs[table.base.name],
                           CONTENT_TYPES[table.base.family], table.unit)
             for table in tables for row in table.rows if row.served_key not in ALL_VARIANTS]
    return plan


# -- report --------------------------------------------------------------------------------------
def ratio(numerator: Optional[Measurement], denominator: Optional[Measurement]) -> Optional[float]:
    if numerator is None or denominator is None or numerator.failure or denominator.throughput <= 0:
        return None
    return numerator.throughput / denominator.throughput


def ratios(results: Dict[str, Measurement]) -> List[dict]:
    out = []
    for (num, den), target in RATIO_TARGETS.items():
        value = ratio(results.get(num), results.get(den))
        out.append({"ratio": f"({num})/({den})", "value": _round(value, 3), "target": target,
                    "met": None if value is None or target is None else value >= target})
    return out


def archive_fidelity(entry: ModelEntry, handler: dict) -> dict:
    """The build's figures against the fp32 weights, as the archive carries them. An fp32 archive
    without figures holds those weights as they are: the reference itself (its meta holds only
    its own held-out accuracy, where there is one)."""
    meta = handler.get("meta", {})
    if meta.get("fidelity") or entry.variant != "fp32":
        return meta.get("fidelity", {})
    figures = {"reference": True}
    if "heldout_accuracy" in meta:
        figures["accuracy"] = meta["heldout_accuracy"]
    if "heldout_r2" in meta:
        figures["r2"] = meta["heldout_r2"]
    return figures


def runtime_label(family: str, handler: dict) -> str:
    """How the archive runs, e.g. "torchscript, int8_x86", "state_dict, bfloat16" or "eager,
    dynamic_int8": the variant names alone do not say what the base archive is."""
    return resolve(FAMILY_DECLARATIONS[family].runtime_label)(handler)


def image_runtime_label(handler: dict) -> str:
    """Image archives: the model's format (state_dict, torchscript, onnx) and what differs."""
    cfg = parse_image_classifier(handler)
    extras = [v for v, default in ((cfg.model.quantization, "none"), (cfg.runtime.dtype, "float32"))
              if v != default]
    return ", ".join([cfg.model.format, *extras])


def eager_runtime_label(handler: dict) -> str:
    """Text and tabular variants are runtime options on the same eager model (the handlers'
    defaults: float32, no quantization)."""
    runtime_cfg = handler.get("runtime") or {}
    extras = [runtime_cfg[k] for k, default in (("quantization", "none"), ("dtype", "float32"))
              if runtime_cfg.get(k, default) != default]
    return ", ".join(["eager", *extras])


def ceiling(in_process: Optional[Measurement], echo: Optional[Measurement]) -> tuple:
    """(rate, which) the served row could reach at most: min(echo ceiling, in-process rate), or
    (None, None) where neither was measured."""
    bounds = [(m.throughput, name) for m, name in ((echo, "echo"), (in_process, "in-process"))
              if m is not None and not m.failure and m.throughput > 0]
    return min(bounds) if bounds else (None, None)


def variant_report(table: VariantTable, results: Dict[str, Measurement]) -> List[dict]:
    """The variants table's rows, for the JSON and the markdown alike."""
    echo = results.get(ECHO_KEY)
    fp32 = next((r for r in table.rows if r.entry.variant == "fp32"), None)
    fp32_in_process = results.get(fp32.in_process_key) if fp32 else None
    fp32_served = results.get(fp32.served_key) if fp32 else None
    report = []
    for row in table.rows:
        in_process, served = results.get(row.in_process_key), results.get(row.served_key)
        handler = read_model_config(os.path.join(MODEL_STORE, row.entry.mar_name))["handler"]
        bound, bound_of = ceiling(in_process, echo)
        reached = None if bound is None or served is None or served.failure else served.throughput / bound
        report.append({
            "variant": row.entry.variant, "archive": row.entry.mar_name, "family": table.base.family,
            "runtime": runtime_label(table.base.family, handler),
            "in_process": in_process.summary() if in_process else None,
            "served": served.summary() if served else None,
            "served_over_in_process": _round(ratio(served, in_process), 3),
            "speed_vs_fp32_served": _round(ratio(served, fp32_served), 3),
            "speed_vs_fp32_in_process": _round(ratio(in_process, fp32_in_process), 3),
            # served throughput / min(echo ceiling, in-process rate): how close to what it could reach
            "served_over_ceiling": _round(reached, 3), "ceiling": bound_of,
            "fidelity": archive_fidelity(row.entry, handler)})
    return report


def fidelity_cell(metric: str, figures: dict) -> str:
    if metric == "embedding":
        if figures.get("reference"):
            return "reference"
        if "min_cosine" not in figures:
            return "-"
        lossy = " (lossy)" if figures.get("lossy") else ""
        return f"{figures['min_cosine']:.5f}, {figures['mean_cosine']:.5f}, {figures['pair_order']:.2f}{lossy}"
    if metric == "regression":
        if "r2" not in figures:
            return "-"
        drop = "reference" if figures.get("reference") else f"drop {figures['r2_drop']:.4f}"
        return f"{figures['r2']:.4f} ({drop})"
    if metric == "accuracy":
        if "accuracy" not in figures:
            return "-"
        drop = "reference" if figures.get("reference") else f"drop {figures['accuracy_drop_points']:.2f} points"
        return f"{100 * figures['accuracy']:.2f}% ({drop})"
    if figures.get("reference"):
        return "reference"
    if "top1_agreement" not in figures:
        return "-"
    return f"{figures['top1_agreement']:.4f}, {figures['mean_cosine']:.5f}"


FIDELITY_HEADERS = {"agreement": "fidelity (top-1 agreement, mean cosine)",
                    "accuracy": "held-out accuracy (drop vs fp32)",
                    "embedding": "fidelity (min cosine, mean cosine to fp32, paraphrase order)",
                    "regression": "held-out R^2 (drop vs fp32)"}


def header_markdown(header: dict) -> List[str]:
    return [f"{', '.join(header['models'])}: {header['seconds']:g} s per served row and "
            f"{header['in_process_seconds']:g} s "
            f"per in-process row after {header['warmup']:g} s warm-up, concurrency "
            f"{header['concurrency']}, {header['cpu_count']} CPU cores, {header['started']}",
            f"Machine: {header['machine']}; torch {header['torch']}, onnxruntime "
            f"{header['onnxruntime']}, Python {header['python']}; whole run {header['duration_s']:.0f} s",
            ""]


def foundation_markdown(results: Dict[str, Measurement], ratio_rows: List[dict]) -> List[str]:
    lines = ["| variant | throughput (img/s) | p50 ms | p99 ms | errors |",
             "|---|---:|---:|---:|---:|"]
    for key in ALL_VARIANTS:
        if key in results:
            r = results[key]
            lines.append(f"| {TITLES[key]} | {_throughput(r)} | {_fmt(r.percentile(50))} | "
                         f"{_fmt(r.percentile(99))} | {_errors(r)} |")
    lines.append("")
    for row in ratio_rows:
        value = "n/a (variant not run)" if row["value"] is None else f"{row['value']:.2f}"
        target = ""
        if row["target"] is not None:
            verdict = "" if row["met"] is None else (" - met" if row["met"] else " - NOT met")
            target = f"  (target >= {row['target']}{verdict})"
        lines.append(f"- throughput {row['ratio']}: {value}{target}")
    lines.append("")
    lines += contention_notes(results, ALL_VARIANTS)
    if "a" in results and not results["a"].failure:
        lines.append(f"(a) latency is per batch of {results['a'].settings['batch_size']}; "
                     "served latencies are per request, measured by the client.")
    for key in ALL_VARIANTS:
        if key in results:
            lines.append(f"- {key}: settings {results[key].settings}; top-1 {results[key].answers}")
    return lines + [""]


def variants_markdown(table: VariantTable, report: List[dict], results: Dict[str, Measurement],
                      concurrency: int) -> List[str]:
    base, unit = table.base, table.unit
    lines = [f"Variants of {base.name} (model_store/{base.name}[_<variant>].mar; in-process batch "
             f"{base.serving['batchSize']}, served with the catalog's serving settings):", "",
             f"| variant | in-process {unit}/s | served {unit}/s (concurrency {concurrency}) | p50 ms | "
             f"p99 ms | served/in-process | served/min(echo, in-process) | speed vs fp32 served | "
             f"{FIDELITY_HEADERS[table.metric]} |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row, figures in zip(table.rows, report):
        in_process, served = results.get(row.in_process_key), results.get(row.served_key)
        lines.append(
            f"| {row.entry.variant} ({figures['runtime']}) | {_throughput(in_process)} | "
            f"{_throughput(served)} | {_fmt(served.percentile(50) if served else None)} | "
            f"{_fmt(served.percentile(99) if served else None)} | "
            f"{_fmt(figures['served_over_in_process'], 2)} | {ceiling_cell(figures)} | "
            f"{_fmt(figures['speed_vs_fp32_served'], 2)} | {fidelity_cell(table.metric, figures['fidelity'])} |")
    lines.append("")
    keys = [k for row in table.rows for k in (row.in_process_key, row.served_key)]
    failed = [f"- {k}: FAILED {results[k].failure}" for k in keys if k in results and results[k].failure]
    errors = [f"- {k}: {_errors(results[k])} errors, first: {results[k].first_error}"
              for k in keys if k in results and results[k].errors]
    lines += failed + errors + ([""] if failed or errors else [])
    lines += contention_notes(results, keys)
    lines.append(f"One request carries one {ITEM_NOUNS[base.family]}: served {unit}/s is also requests/s. "
                 "p50/p99 are the served latencies per request, measured by the client; fidelity "
                 "figures are the build's (handler.meta.fidelity in each archive).")
    if ECHO_KEY in results and not results[ECHO_KEY].failure:
        lines.append("served/min(echo, in-process): the served rate over the most it could reach, the "
                     "echo ceiling or the in-process rate, whichever is lower (named in brackets).")
    shared = sorted(set(keys) & set(ALL_VARIANTS))
    if shared:
        lines.append(f"The fp32 row is {' and '.join(f'({k})' for k in shared)} of the first table, "
                     "measured once.")
    return lines + [""]


def ceiling_cell(figures: dict) -> str:
    if figures.get("served_over_ceiling") is None:
        return "-"
    return f"{figures['served_over_ceiling']:.2f} ({figures['ceiling']})"


def echo_markdown(echo: Measurement) -> List[str]:
    """The echo ceiling: TorchServe's per-request ceiling on this machine."""
    if echo.failure:
        return [f"Echo ceiling ({ECHO_MODEL}.mar): FAILED {echo.failure}", ""]
    settings = echo.settings
    lines = [f"Echo ceiling (TorchServe's per-request ceiling on this machine): {echo.throughput:.1f} req/s, "
             f"p50 {_fmt(echo.percentile(50))} ms, p99 {_fmt(echo.percentile(99))} ms, "
             f"{_errors(echo)} errors; a handler that answers \"ok\" with no model "
             f"(scripts/echo_handler.py), batch {settings.get('batch_size')}, delay "
             f"{settings.get('max_batch_delay_ms')} ms, {settings.get('workers')} worker, concurrency "
             f"{settings.get('concurrency')}, the same client as every served row."]
    lines += contention_notes({ECHO_KEY: echo}, [ECHO_KEY])
    return lines


def client_markdown(header: dict) -> List[str]:
    client = header.get("client")
    if not client:
        return []
    line = f"Load generator of the served rows: {client['description']}"
    if client.get("version"):
        line += f" - {client['version']}"
    line += ("; every input in turn, one per request. Each served row's answers to every input are "
             "also checked one request at a time (Python) before it is measured.")
    return [line, ""]


def markdown(results: Dict[str, Measurement], ratio_rows: List[dict],
             tables: Sequence[VariantTable], reports: Dict[str, List[dict]], header: dict) -> str:
    lines = header_markdown(header)
    lines += client_markdown(header)
    if ECHO_KEY in results:
        lines += echo_markdown(results[ECHO_KEY])
    if any(k in results for k in ALL_VARIANTS):
        lines += foundation_markdown(results, ratio_rows)
    for table in tables:
        lines += variants_markdown(table, reports[table.base.name], results, header["concurrency"])
    return "\n".join(lines)


def contention_notes(results: Dict[str, Measurement], keys: Sequence[str]) -> List[str]:
    measured = {k: results[k].foreign_cpu_cores for k in keys
                if k in results and results[k].foreign_cpu_cores is not None}
    if not measured:
        return []
    listed = ", ".join(f"({k}) {v:.2f}" for k, v in measured.items())
    lines = [f"CPU cores used by other programs while measuring: {listed}."]
    clients = {k: results[k].client_cpu_cores for k in keys
               if k in results and results[k].client_cpu_cores is not None}
    if clients:
        names = sorted({results[k].client.split(" ")[0] for k in clients if results[k].client})
        lines.append(f"CPU cores used by the client ({', '.join(names)}) while measuring: "
                     f"{', '.join(f'({k}) {v:.2f}' for k, v in clients.items())}.")
    noisy = [k for k, v in measured.items() if v > FOREIGN_CPU_WARNING]
    if noisy:
        lines.append(f"WARNING: other programs competed for the CPU during "
                     f"{', '.join(f'({k})' for k in noisy)}; rerun on a quiet machine before "
                     f"trusting these numbers.")
    return lines + [""]


def _fmt(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _throughput(result: Optional[Measurement]) -> str:
    if result is None:
        return "-"
    return "failed" if result.failure else f"{result.throughput:.1f}"


def _errors(result: Measurement) -> str:
    if result.failure:
        return f"failed: {result.failure}"
    errors = sum(result.errors.values())
    detail = f" ({', '.join(f'{k}: {v}' for k, v in result.errors.items())})" if errors else ""
    return f"{errors}{detail}"


def machine_description() -> str:
    """CPU model and the vector extensions that decide how fast bf16 and int8 can be here."""
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == "model name":
                    model = value.strip()
                elif name.strip() == "flags":
                    flags = set(value.split())
                    break
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    found = [f for f in wanted if f in flags]
    return f"{model}, {runtime.available_cores()} usable cores, {' '.join(found) or 'no AVX2'}"


def _version(package: str) -> str:
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:  # noqa: BLE001 - only for the report
        return "not installed"


def write_results(results: Dict[str, Measurement], ratio_rows: List[dict],
                  reports: Dict[str, List[dict]], header: dict, table: str) -> None:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, "latest.json"), "w", encoding="utf-8") as f:
        # "variants" keeps its meaning from before the archive variants: the foundation's (a)-(d).
        json.dump({**header, "variants": {k: results[k].summary() for k in ALL_VARIANTS if k in results},
                   "ratios": ratio_rows, "archive_variants": reports,
                   "echo_ceiling": results[ECHO_KEY].summary() if ECHO_KEY in results else None},
                  f, indent=2)
    with open(os.path.join(RESULTS_DIR, "latest.md"), "w", encoding="utf-8") as f:
        f.write(table)


# -- main ----------------------------------------------------------------------------------------
def parse_args(argv, variant_names: Sequence[str]):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # 15 s and 10 s keep the whole default run (4 foundation rows, 2 x 5 image variant rows, 3 text
    # and 2 tabular rows) near 12 minutes on a 2-core machine; the rates are stable well within that.
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per served row")
    parser.add_argument("--in-process-seconds", type=float, default=10.0,
                        help="measured seconds per in-process row (steadier: no queueing or HTTP)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each")
    parser.add_argument("--concurrency", type=int, default=16, help="client threads (served rows)")
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help=f"comma-separated subset of {','.join(FAMILIES)}: the tables to measure "
                             "(the foundation table is image)")
    parser.add_argument("--only", default=",".join(ALL_VARIANTS),
                        help="comma-separated subset of a,b,c,d (the foundation table)")
    parser.add_argument("--variants", default=",".join(variant_names),
                        help=f"comma-separated archive variants for the variants tables "
                             f"(default all: {','.join(variant_names)})")
    parser.add_argument("--skip-variants", action="store_true",
                        help="only the foundation table (a)-(d)")
    parser.add_argument("--models", default=",".join(INPUTS),
                        help=f"comma-separated subset of {','.join(INPUTS)} (default all): the models of "
                             f"--families to measure; the foundation table is {MODEL}'s")
    parser.add_argument("--client", choices=sorted(CLIENTS), default="wrk",
                        help="load generator of the served rows: wrk (default; scripts/ensure_loadgen.sh "
                             "installs it) or python (the earlier client threads, for comparison only)")
    parser.add_argument("--skip-echo", action="store_true",
                        help="no echo ceiling row (nor the served/min(echo, in-process) figures)")
    args = parser.parse_args(argv)
    args.families = _comma_list(parser, "--families", args.families, FAMILIES)
    args.only = _comma_list(parser, "--only", args.only, ALL_VARIANTS)
    args.variants = _comma_list(parser, "--variants", args.variants, variant_names)
    args.models = _comma_list(parser, "--models", args.models, list(INPUTS))
    if args.seconds <= 0 or args.in_process_seconds <= 0 or args.warmup < 0 or args.concurrency < 1:
        parser.error("--seconds and --in-process-seconds must be > 0, --warmup >= 0 and "
                     "--concurrency >= 1")
    return args


def _comma_list(parser, option: str, value: str, allowed: Sequence[str]) -> List[str]:
    items = [k.strip() for k in value.split(",") if k.strip()]
    if not items or set(items) - set(allowed):
        parser.error(f"{option} takes a comma-separated subset of {','.join(allowed)}")
    return items


def variant_names(catalog: Catalog) -> List[str]:
    """fp32 and the catalog's variants of the models the benchmark has inputs for, in catalog order."""
    names = [e.variant for e in catalog.models if e.base in INPUTS]
    return list(dict.fromkeys(names))


def main(argv=None) -> int:
    catalog = load_catalog()
    args = parse_args(argv, variant_names(catalog))
    started = time.perf_counter()
    entry = catalog.model(MODEL)
    # The foundation table is EfficientNet-Lite0's: image family.
    foundation = args.only if "image" in args.families and MODEL in args.models else []
    tables = [] if args.skip_variants else plan_variant_tables(catalog, args.variants, foundation,
                                                               args.families)
    tables = [t for t in tables if t.base.name in args.models]
    needed = [entry.mar_name] if foundation else []
    needed += [row.entry.mar_name for t in tables for row in t.rows]
    if not needed:
        log(f"nothing to measure for --families {','.join(args.families)}"
            f"{' with --skip-variants' if args.skip_variants else ''}")
        return 1
    missing = [name for name in needed if not os.path.isfile(os.path.join(MODEL_STORE, name))]
    if missing:
        log(f"model_store/ lacks {', '.join(missing)}: run `make build` first")
        return 1
    models = list(dict.fromkeys([*([MODEL] if foundation else []), *(t.base.name for t in tables)]))
    inputs = {name: INPUTS[name]() for name in models}
    in_process = in_process_plan(entry, foundation, tables)
    served = served_plan(entry, foundation, tables, inputs)
    if served and not args.skip_echo:
        served.insert(0, echo_variant())  # first, on the freshly started server
    log(f"{len(in_process)} in-process row(s), then {len(served)} served row(s) on one TorchServe "
        f"(client: {args.client})")
    header = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "seconds": args.seconds, "in_process_seconds": args.in_process_seconds,
              "warmup": args.warmup, "concurrency": args.concurrency,
              "cpu_count": os.cpu_count(), "machine": machine_description(),
              "torch": torch.__version__, "onnxruntime": _version("onnxruntime"),
              "python": platform.python_version(), "families": args.families, "models": models,
              "inputs": {name: len(bodies) for name, bodies in inputs.items()}}
    if served:
        header["client"] = {"name": args.client, "description": CLIENTS[args.client],
                            "version": loadgen.version() if args.client == "wrk" else "",
                            **({"threads": loadgen.THREADS} if args.client == "wrk" else {})}
    if MODEL in inputs:
        header["photos"] = list(inputs[MODEL])
    results: Dict[str, Measurement] = {}
    workdir = tempfile.mkdtemp(prefix="ts-bench-")
    completed = False
    try:
        for key, row_entry in in_process:
            results[key] = attempt(key, lambda: measure_in_process(
                key, row_entry, inputs[row_entry.base], args.warmup, args.in_process_seconds, workdir),
                ITEM_UNITS[row_entry.family])
        if served:
            results.update((r.variant, r) for r in run_served(entry, catalog, served, args, workdir))
        completed = True
    finally:
        failed = sorted(k for k, r in results.items() if r.failure)
        if not completed or failed:
            log(f"kept {workdir} (server logs, archives) for a look")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    header["duration_s"] = round(time.perf_counter() - started, 1)
    ratio_rows = ratios(results)
    reports = {t.base.name: variant_report(t, results) for t in tables}
    text = markdown(results, ratio_rows, tables, reports, header)
    write_results(results, ratio_rows, reports, header, text)
    print("\n" + text, flush=True)
    log(f"done in {header['duration_s']:.0f} s; results in "
        f"{os.path.relpath(RESULTS_DIR, ROOT)}/latest.json and latest.md")
    if failed:
        log(f"FAILED rows: {', '.join(failed)}")
    return 1 if failed else 0



if __name__ == "__main__":
    sys.exit(main())
