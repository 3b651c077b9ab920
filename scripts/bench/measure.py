"""The bench's results (Measurement), its real inputs per family and what every row shares."""
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import psutil

from models import sample_data, sentences
from models.catalog import ROOT, ModelEntry, load_catalog
from models.families import FAMILIES as FAMILY_DECLARATIONS
from models.families import FOUNDATION_MODEL, resolve, samples_of

MODEL = FOUNDATION_MODEL
RESULTS_DIR = os.path.join(ROOT, "build", "bench")
TITLES = {
    "a": "(a) in-process pipeline",
    "b": "(b) served, this project's handler",
    "c": "(c) served, stock image_classifier, TorchServe defaults",
    "d": "(d) served, stock image_classifier, (b)'s batching",
}

# Other programs on the machine using more than this many cores make a measurement suspect.
FOREIGN_CPU_WARNING = 0.25
IN_PROCESS, SERVED = "in-process", "served"

# What one item of each family is called in the tables (one request carries one item), and how
# clients send it (the worker decodes the body by this, see worker_value): models/families.py.
ITEM_UNITS = {name: f.item_unit for name, f in FAMILY_DECLARATIONS.items()}
ITEM_NOUNS = {name: f.item_noun for name, f in FAMILY_DECLARATIONS.items()}
CONTENT_TYPES = {name: f.content_type for name, f in FAMILY_DECLARATIONS.items()}

# The echo ceiling: a handler that answers a constant (scripts/bench/echo_handler.py), no model file,
# registered with the light models' batching (digits and diabetes in the catalog: batch 8, 5 ms,
# one worker): what TorchServe itself can answer per second on this machine.
ECHO_KEY = "echo ceiling"
ECHO_MODEL = "echo"


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
               "p50_ms": rounded(self.percentile(50)), "p99_ms": rounded(self.percentile(99)),
               "latency_of": self.latency_unit, "items_ok": self.items,
               "measured_s": round(self.seconds, 3), "errors": sum(self.errors.values()),
               "errors_by_kind": {str(k): v for k, v in self.errors.items()},
               "first_error": self.first_error, "foreign_cpu_cores": rounded(self.foreign_cpu_cores, 2),
               "failure": self.failure, "settings": self.settings, "answers": self.answers}
        if self.client:
            out.update(client=self.client, client_cpu_cores=rounded(self.client_cpu_cores, 3))
        if self.unit == ITEM_UNITS["image"]:
            # The image rows' names from before the text and tabular rows (scripts/deploy/kserve.py reads
            # throughput_img_s).
            out.update(throughput_img_s=throughput, images_ok=self.items, top1=self.answers)
        return out


def rounded(value: Optional[float], digits: int = 1) -> Optional[float]:
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


def archive_stem(entry: ModelEntry) -> str:
    """digits, digits_int8, digits_v2.0: unique per archive, where a model's name is not."""
    return entry.mar_name[:-len(".mar")]


def fmt_number(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
