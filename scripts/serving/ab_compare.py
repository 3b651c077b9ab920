"""A/B comparison: the same inputs sent to two versions (or two models), side by side.

    python -m scripts.serving.ab_compare digits/1.0 digits/2.0 --inputs digits
    python -m scripts.serving.ab_compare efficientnet_lite0 efficientnet_lite0_int8 --inputs photos --count 40 --json ab.json

Each target is `model[/version]` (no version: the default version). Input i goes to both targets,
which of them first alternating, through one shared pool of `--concurrency` senders, so that both
see the same load. Reported per target: requests, errors, p50/p90/p99 latency, throughput, and
accuracy where the inputs have labels; between the targets: how far their answers agree, by the
kind of answer (top-k labels: same top-1 label; embeddings: cosine; predictions: difference).
Exit code 1 when a request failed.
"""
import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import requests

from scripts.serving.ts_client import TorchServeClient


@dataclass(frozen=True)
class Sample:
    name: str
    body: bytes
    content_type: str
    label: object = None  # the expected answer where known (class label, regression target)


@dataclass(frozen=True)
class Target:
    model: str
    version: Optional[str] = None

    def __str__(self):
        return self.model + (f"/{self.version}" if self.version else "")


@dataclass
class Outcome:
    index: int            # which input
    status: int           # HTTP status; 0 when no answer came back
    latency_s: float
    body: object          # the decoded JSON answer, or the error text


# -- input sets: name -> function returning the samples ------------------------------------------
def digits_inputs() -> List[Sample]:
    """The held-out digits (never seen in training) as 8-bit PNGs, with their labels."""
    from models import sample_data
    _, _, images, labels = sample_data.digits_split()
    return [Sample(f"heldout_{i}", sample_data.png_bytes(pixels), "image/png", str(label))
            for i, (pixels, label) in enumerate(zip(images, labels))]


def photo_inputs(folder: str = os.path.join("build", "samples")) -> List[Sample]:
    """The sample photographs (build/samples/*.jpg, written by make build); no labels."""
    from models.catalog import ROOT
    folder = os.path.join(ROOT, folder)
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".jpg", ".jpeg")))
    if not names:
        raise FileNotFoundError(f"no .jpg in {folder}: run `make build`")
    samples = []
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            samples.append(Sample(name, f.read(), "image/jpeg"))
    return samples


INPUT_SETS: Dict[str, Callable[[], List[Sample]]] = {
    "digits": digits_inputs,
    "photos": photo_inputs,
    # More sets go here, each a function returning Samples (body bytes, content type, label):
    #   "texts":    sentences for minilm, body = a text or a JSON list of texts, no label
    #   "diabetes": JSON rows for diabetes, label = the regression target of each row
}


# -- comparing answers, by the kind of answer ------------------------------------------------------
def response_kind(body) -> str:
    if isinstance(body, list) and body and isinstance(body[0], dict) and "label" in body[0]:
        return "topk"           # image classifiers: [{"label", "index", "probability"}, ...]
    if isinstance(body, dict) and "embeddings" in body:
        return "embeddings"     # {"embeddings": [[...], ...], ...}
    if isinstance(body, dict) and "predictions" in body:
        return "predictions"    # {"predictions": [...], ...}
    return "other"


def _cosines(a: Sequence, b: Sequence) -> List[float]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    x, y = np.atleast_2d(x), np.atleast_2d(y)
    dot = (x * y).sum(axis=1)
    return (dot / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))).tolist()


def agreement(pairs: List[tuple]) -> dict:
    """How far two targets' answers to the same inputs agree; ``pairs`` are (a, b) answers."""
    if not pairs:
        return {"compared": 0}
    kinds = {response_kind(answer) for pair in pairs for answer in pair}
    kind = kinds.pop() if len(kinds) == 1 else "mixed"  # mixed: only identical answers are counted
    out = {"compared": len(pairs), "kind": kind,
           "identical": sum(a == b for a, b in pairs) / len(pairs)}
    if kind == "topk":
        out["top1_agreement"] = sum(a[0]["label"] == b[0]["label"] for a, b in pairs) / len(pairs)
    elif kind == "embeddings":
        cosines = [c for a, b in pairs for c in _cosines(a["embeddings"], b["embeddings"])]
        out.update(mean_cosine=float(np.mean(cosines)), min_cosine=float(np.min(cosines)))
    elif kind == "predictions":
        diffs = [abs(float(x) - float(y)) for a, b in pairs
                 for x, y in zip(np.ravel(a["predictions"]), np.ravel(b["predictions"]))]
        out.update(mean_abs_difference=float(np.mean(diffs)), max_abs_difference=float(np.max(diffs)))
    return out


def quality(answers: List[tuple]) -> dict:
    """Accuracy (top-k answers) or mean absolute error (predictions) against the labels;
    ``answers`` are (answer, label) for the inputs that have a label."""
    if not answers:
        return {}
    kind = response_kind(answers[0][0])
    if kind == "topk":
        return {"accuracy": sum(a[0]["label"] == str(label) for a, label in answers) / len(answers)}
    if kind == "predictions":
        errors = [abs(float(p) - float(t)) for a, label in answers
                  for p, t in zip(np.ravel(a["predictions"]), np.ravel(label))]
        return {"mean_abs_error": float(np.mean(errors))}
    return {}


# -- sending --------------------------------------------------------------------------------------
def send(client: TorchServeClient, target: Target, index: int, sample: Sample) -> Outcome:
    started = time.perf_counter()
    try:
        response = client.predict_raw(target.model, sample.body, target.version,
                                      content_type=sample.content_type)
    except requests.RequestException as exc:
        return Outcome(index, 0, time.perf_counter() - started, str(exc))
    latency = time.perf_counter() - started
    try:
        body = response.json()
    except ValueError:
        body = response.text
    return Outcome(index, response.status_code, latency, body)


def run_comparison(client: TorchServeClient, targets: Sequence[Target], samples: List[Sample],
                   count: Optional[int] = None, concurrency: int = 4) -> dict:
    """Send inputs 0..count-1 (cycling through ``samples``) to every target and report."""
    count = len(samples) if count is None else count
    order = list(range(len(targets)))
    jobs = [(t, i) for i in range(count)  # alternate which target gets input i first
            for t in (order if i % 2 == 0 else order[::-1])]
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [(t, pool.submit(send, client, targets[t], i, samples[i % len(samples)]))
                   for t, i in jobs]
        outcomes = [[] for _ in targets]  # by position: the two targets may be the same
        for t, future in futures:
            outcomes[t].append(future.result())
    wall_s = time.perf_counter() - started
    return report(targets, samples, outcomes, wall_s, concurrency)


def target_report(outcomes: List[Outcome], samples: List[Sample], wall_s: float) -> dict:
    ok = [o for o in outcomes if o.status == 200]
    latencies_ms = [o.latency_s * 1000 for o in ok]
    p50, p90, p99 = np.percentile(latencies_ms, [50, 90, 99]).tolist() if ok else (None,) * 3
    errors = [o for o in outcomes if o.status != 200]
    out = {"requests": len(outcomes), "errors": len(errors),
           "p50_ms": p50, "p90_ms": p90, "p99_ms": p99,
           "throughput_rps": len(ok) / wall_s if wall_s > 0 else float("nan"),
           "first_errors": [f"input {o.index}: {o.status} {o.body}"[:300] for o in errors[:3]]}
    labelled = [(o.body, samples[o.index % len(samples)].label) for o in ok
                if samples[o.index % len(samples)].label is not None]
    out.update(quality(labelled))
    return out


def report(targets: Sequence[Target], samples: List[Sample], outcomes: List[List[Outcome]],
           wall_s: float, concurrency: int) -> dict:
    answers_b = {o.index: o.body for o in outcomes[1] if o.status == 200}
    pairs = [(o.body, answers_b[o.index]) for o in outcomes[0]
             if o.status == 200 and o.index in answers_b]
    names = [str(t) for t in targets]
    if names[0] == names[1]:
        names = [f"{names[0]} (A)", f"{names[1]} (B)"]
    return {"targets": names, "inputs": len(outcomes[0]), "distinct_inputs": len(samples),
            "concurrency": concurrency, "wall_s": wall_s,
            "per_target": {n: target_report(o, samples, wall_s) for n, o in zip(names, outcomes)},
            "agreement": agreement(pairs)}


def format_report(result: dict) -> str:
    names = result["targets"]
    rows = [("requests", "{:d}"), ("errors", "{:d}"), ("p50_ms", "{:.1f}"), ("p90_ms", "{:.1f}"),
            ("p99_ms", "{:.1f}"), ("throughput_rps", "{:.1f}"), ("accuracy", "{:.4f}"),
            ("mean_abs_error", "{:.4f}")]
    width = max(16, *(len(n) + 2 for n in names))
    lines = [f"{result['inputs']} inputs ({result['distinct_inputs']} distinct) to each target, "
             f"concurrency {result['concurrency']}, {result['wall_s']:.1f} s "
             f"(throughput: each target's, while sharing the server with the other)",
             f"{'':<16}" + "".join(f"{n:>{width}}" for n in names)]
    for key, fmt in rows:
        values = [result["per_target"][n].get(key) for n in names]
        if all(v is None for v in values):
            continue
        lines.append(f"{key:<16}" + "".join(
            f"{fmt.format(v) if v is not None else '-':>{width}}" for v in values))
    agree = result["agreement"]
    lines.append("agreement: " + ", ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in agree.items()))
    for name in names:
        for error in result["per_target"][name]["first_errors"]:
            lines.append(f"{name} error: {error}")
    return "\n".join(lines)


def parse_target(text: str) -> Target:
    model, _, version = text.partition("/")
    if not model:
        raise argparse.ArgumentTypeError(f"{text!r}: expected model or model/version")
    return Target(model, version or None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.serving.ab_compare",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=parse_target, help="model[/version]")
    parser.add_argument("b", type=parse_target, help="model[/version]")
    parser.add_argument("--inputs", choices=sorted(INPUT_SETS), required=True)
    parser.add_argument("--count", type=int, help="inputs sent to each target (default: the whole "
                                                  "set once; more cycles through it)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--json", help="also write the report to this file")
    parser.add_argument("--inference-url", help="default: config.properties' inference_address")
    parser.add_argument("--management-url", help="default: config.properties' management_address")
    parser.add_argument("--home", help="folder holding the server's key_file.json (default: the "
                                       "project root)")
    args = parser.parse_args(argv)
    if not (args.inference_url and args.management_url and args.home):
        from scripts.serving.manage import project_defaults
        inference_url, management_url, home = project_defaults()
        args.inference_url = args.inference_url or inference_url
        args.management_url = args.management_url or management_url
        args.home = args.home or home
    client = TorchServeClient(args.inference_url, args.management_url, home=args.home)
    try:
        samples = INPUT_SETS[args.inputs]()
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    result = run_comparison(client, [args.a, args.b], samples, args.count, args.concurrency)
    print(format_report(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    failed = sum(t["errors"] for t in result["per_target"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
