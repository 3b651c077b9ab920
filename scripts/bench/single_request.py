"""Concurrency 1: what one request costs served against in-process, and a 12 MP phone photo
against china.jpg, side by side in one run (part of `make bench`).

    python -m scripts.bench.single_request [--model efficientnet_lite0] [--seconds 8] [--repeats 40]

Rows, for each input (china.jpg, a 4032x3024 JPEG of about 7.8 MB):
  in-process   the archive's handler called on one request (batch of 1), no HTTP: the floor;
  served       TorchServe with the catalog's throughput settings (a lone request waits out
               maxBatchDelay before its batch of 1 runs);
  latency      the same archive registered with batchSize 1 (no batching delay at all).
Served rows are driven by wrk with one connection; p50/p99 are wrk's.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Dict

from models.catalog import MODEL_STORE, Catalog, load_catalog
from models.families import FOUNDATION_MODEL
from models.sample_data import phone_photo_bytes, photo_bytes
from scripts.bench import loadgen
from scripts.bench.in_process_rows import InProcessPipeline, extract_archive, read_model_config
from scripts.bench.measure import CONTENT_TYPES, RESULTS_DIR, worker_value
from scripts.bench.report import machine_description
from scripts.bench.served import ServedVariant, catalog_registration, register, unregister
from scripts.serving.ts_server import TorchServe

LATENCY_SETTINGS = {"batch_size": 1, "max_batch_delay": 0}
PHONE = "12 MP phone photo"


def log(message: str) -> None:
    print(f"[single-request] {message}", flush=True)


def inputs() -> Dict[str, bytes]:
    return {"china.jpg": photo_bytes()[0], PHONE: phone_photo_bytes()}


def in_process_p50(entry, bodies: Dict[str, bytes], repeats: int, workdir: str) -> Dict[str, float]:
    """p50 ms of one request through the handler's stages, inputs interleaved so that a burst of
    other load hits them alike."""
    mar_path = os.path.join(MODEL_STORE, entry.mar_name)
    archive_dir = extract_archive(mar_path, os.path.join(workdir, "in-process"))
    pipeline = InProcessPipeline(archive_dir, {**read_model_config(mar_path), "batchSize": 1})
    content_type = CONTENT_TYPES[entry.family]
    values = {name: worker_value(body, content_type) for name, body in bodies.items()}
    times: Dict[str, list] = {name: [] for name in values}
    for round_ in range(repeats + 3):
        for name, value in values.items():
            started = time.perf_counter()
            pipeline([value])
            if round_ >= 3:  # three unmeasured rounds warm the allocator and the caches
                times[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(ms) for name, ms in times.items()}


def served_p50(entry, catalog: Catalog, bodies: Dict[str, bytes], seconds: float,
               workdir: str) -> Dict[str, Dict[str, dict]]:
    """setting -> input -> wrk's figures at one connection."""
    store = os.path.join(workdir, "store")
    os.makedirs(store)
    os.symlink(os.path.join(MODEL_STORE, entry.mar_name), os.path.join(store, entry.mar_name))
    server = TorchServe.from_catalog(os.path.join(workdir, "server"), catalog, store)
    settings = {"served": catalog_registration(entry),
                "latency": {**catalog_registration(entry), **LATENCY_SETTINGS}}
    out: Dict[str, Dict[str, dict]] = {}
    server.start()
    try:
        for label, registration in settings.items():
            variant = ServedVariant(label, entry.name, entry.mar_name, registration)
            applied = register(server, variant)
            try:
                token = server.client.key("inference")
                url = f"{server.inference_url}/predictions/{entry.name}"
                out[label] = {}
                for name, body in bodies.items():
                    common = (url, [body], CONTENT_TYPES[entry.family], token, 1)
                    loadgen.run(*common, 1.0, 120, workdir)  # warm-up, dropped
                    load = loadgen.run(*common, seconds, 120, workdir)
                    out[label][name] = {"p50_ms": load.latency_ms.get("p50"),
                                        "p99_ms": load.latency_ms.get("p99"), "requests": load.ok,
                                        "errors": sum(load.errors.values()),
                                        "client_cpu_cores": load.client_cores, "applied": applied}
                    log(f"{label} {name}: p50 {out[label][name]['p50_ms']:.1f} ms "
                        f"({load.ok} answers, {out[label][name]['errors']} errors)")
            finally:
                unregister(server, entry.name)
    finally:
        server.stop()
    return out


def report(entry, in_process: Dict[str, float], served: Dict[str, Dict[str, dict]]) -> dict:
    rows = []
    for name, floor in in_process.items():
        row = {"input": name, "in_process_p50_ms": round(floor, 2)}
        for label, figures in served.items():
            p50 = figures[name]["p50_ms"]
            row[f"{label}_p50_ms"] = round(p50, 2)
            row[f"{label}_p99_ms"] = round(figures[name]["p99_ms"], 2)
            row[f"{label}_minus_in_process_ms"] = round(p50 - floor, 2)
        rows.append(row)
    china, phone = rows[0], rows[1]
    ratios = {f"{k}: {PHONE} / china.jpg": round(phone[k] / china[k], 2)
              for k in ("in_process_p50_ms", *(f"{label}_p50_ms" for label in served))}
    return {"model": entry.name, "archive": entry.mar_name, "machine": machine_description(),
            "rows": rows, "ratios": ratios}


def markdown(result: dict) -> str:
    labels = [k[:-len("_p50_ms")] for k in result["rows"][0] if k.endswith("_p50_ms")
              and k != "in_process_p50_ms"]
    lines = [f"Concurrency 1, `{result['archive']}` ({result['machine']}):", "",
             "| input | in-process p50 | " + " | ".join(f"{label} p50 (p99) | {label} - in-process"
                                                       for label in labels) + " |",
             "|---|---:|" + "---:|---:|" * len(labels)]
    for row in result["rows"]:
        cells = " | ".join(f"{row[f'{label}_p50_ms']:.1f} ms ({row[f'{label}_p99_ms']:.1f}) | "
                           f"{row[f'{label}_minus_in_process_ms']:+.1f} ms" for label in labels)
        lines.append(f"| {row['input']} | {row['in_process_p50_ms']:.1f} ms | {cells} |")
    lines += ["", "p50 of the 12 MP photo / p50 of china.jpg: "
              + "; ".join(f"{k.split(':')[0].replace('_p50_ms', '')} {v:.2f}x"
                          for k, v in result["ratios"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=FOUNDATION_MODEL)
    parser.add_argument("--seconds", type=float, default=8.0, help="per served row and input")
    parser.add_argument("--repeats", type=int, default=40, help="in-process requests per input")
    args = parser.parse_args(argv)
    catalog = load_catalog()
    entry = catalog.archive(args.model)
    bodies = inputs()
    with tempfile.TemporaryDirectory(prefix="single-request-") as workdir:
        log(f"in-process: {args.repeats} requests per input, batch of 1")
        in_process = in_process_p50(entry, bodies, args.repeats, workdir)
        for name, p50 in in_process.items():
            log(f"in-process {name}: p50 {p50:.1f} ms")
        served = served_p50(entry, catalog, bodies, args.seconds, workdir)
    result = report(entry, in_process, served)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, "single_request.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    text = markdown(result)
    with open(os.path.join(RESULTS_DIR, "single_request.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
