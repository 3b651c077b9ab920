"""Concurrency 1: what one request costs served against in-process, and a 12 MP phone photo
against china.jpg, side by side in one run (part of `make bench`).

    python -m scripts.bench.single_request [--model efficientnet_lite0] [--seconds 8] [--repeats 40]

Rows, for each input (china.jpg, a 4032x3024 JPEG of about 7.8 MB):
  in-process   the archive's handler called on one request (batch of 1), no HTTP: the floor;
  served       TorchServe with the catalog's throughput settings (a lone request waits out
               maxBatchDelay before its batch of 1 runs);
  latency      the same archive registered with batchSize 1 (no batching delay at all).
Served rows are driven by wrk with one connection; p50/p99 are wrk's.

Paired rounds: what one request costs served, on top of the handler itself, measured so that a
shared machine's drift (in-process p50s here move by 50% between runs minutes apart) cancels out:
with the latency setting, each round calls the handler in this process on the input, then sends
the same input to the server (one keep-alive connection, one request at a time); the figure is
the median of the per-round differences. TorchServe alone: the echo handler (no model) at batch 1
and one connection, the part of that difference TorchServe itself costs on this machine.
"""
import http.client
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Dict
from urllib.parse import urlsplit

from models.catalog import MODEL_STORE, Catalog, load_catalog
from models.families import FOUNDATION_MODEL
from models.sample_data import phone_photo_bytes, photo_bytes
from scripts.bench import loadgen
from scripts.bench.in_process_rows import InProcessPipeline, extract_archive, read_model_config
from scripts.bench.measure import CONTENT_TYPES, RESULTS_DIR, worker_value
from scripts.bench.report import machine_description
from scripts.bench.served import (ECHO_MODEL, ServedVariant, build_echo_archive, catalog_registration, register,
                                  unregister)
from scripts.serving.ts_server import TorchServe

LATENCY_SETTINGS = {"batch_size": 1, "max_batch_delay": 0}
ECHO_FLOOR = {"batch_size": 1, "max_batch_delay": 0, "initial_workers": 1, "response_timeout": 30}
PAIRED_ROUNDS = 60
PHONE = "12 MP phone photo"


def log(message: str) -> None:
    print(f"[single-request] {message}", flush=True)


def inputs() -> Dict[str, bytes]:
    return {"china.jpg": photo_bytes()[0], PHONE: phone_photo_bytes()}


def in_process_pipeline(entry, workdir: str) -> InProcessPipeline:
    """The archive's handler in this process, at batch 1, as its worker runs it."""
    mar_path = os.path.join(MODEL_STORE, entry.mar_name)
    archive_dir = extract_archive(mar_path, os.path.join(workdir, "in-process"))
    return InProcessPipeline(archive_dir, {**read_model_config(mar_path), "batchSize": 1})


def in_process_p50(pipeline: InProcessPipeline, values: Dict[str, object], repeats: int) -> Dict[str, float]:
    """p50 ms of one request through the handler's stages, inputs interleaved so that a burst of
    other load hits them alike."""
    times: Dict[str, list] = {name: [] for name in values}
    for round_ in range(repeats + 3):
        for name, value in values.items():
            started = time.perf_counter()
            pipeline([value])
            if round_ >= 3:  # three unmeasured rounds warm the allocator and the caches
                times[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(ms) for name, ms in times.items()}


def paired_rounds(pipeline: InProcessPipeline, value, url: str, body: bytes, content_type: str,
                  token, rounds: int) -> dict:
    """Alternate one in-process call and one served request of the same input: both medians, and
    the median of the per-round difference (served - in-process)."""
    target = urlsplit(url)
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {})}
    connection = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
    in_process, served = [], []
    try:
        for round_ in range(rounds + 3):
            started = time.perf_counter()
            pipeline([value])
            middle = time.perf_counter()
            connection.request("POST", target.path, body=body, headers=headers)
            answer = connection.getresponse()
            answer.read()
            ended = time.perf_counter()
            if answer.status != 200:
                raise RuntimeError(f"paired round: HTTP {answer.status} from {url}")
            if round_ >= 3:  # as in_process_p50: three unmeasured rounds
                in_process.append((middle - started) * 1000)
                served.append((ended - middle) * 1000)
    finally:
        connection.close()
    return {"rounds": rounds, "in_process_p50_ms": round(statistics.median(in_process), 2),
            "served_p50_ms": round(statistics.median(served), 2),
            "gap_p50_ms": round(statistics.median(s - i for s, i in zip(served, in_process)), 2)}


def echo_floor(server: TorchServe, store: str, seconds: float, workdir: str) -> dict:
    """TorchServe alone at one connection: the echo handler (no model), batch 1."""
    build_echo_archive(store, workdir)
    variant = ServedVariant("echo", ECHO_MODEL, f"{ECHO_MODEL}.mar", dict(ECHO_FLOOR))
    register(server, variant)
    try:
        url = f"{server.inference_url}/predictions/{ECHO_MODEL}"
        common = (url, [b"[1.0]"], "application/json", server.client.key("inference"), 1)
        loadgen.run(*common, 1.0, 30, workdir)  # warm-up, dropped
        load = loadgen.run(*common, seconds, 30, workdir)
    finally:
        unregister(server, ECHO_MODEL)
    figures = {"p50_ms": load.latency_ms.get("p50"), "p99_ms": load.latency_ms.get("p99"), "requests": load.ok}
    log(f"TorchServe alone (echo, batch 1, one connection): p50 {figures['p50_ms']:.2f} ms")
    return figures


def served_p50(entry, catalog: Catalog, bodies: Dict[str, bytes], seconds: float, workdir: str,
               pipeline: InProcessPipeline, values: Dict[str, object]) -> tuple:
    """(setting -> input -> wrk's figures at one connection, input -> paired rounds of the latency
    setting, TorchServe alone)."""
    store = os.path.join(workdir, "store")
    os.makedirs(store)
    os.symlink(os.path.join(MODEL_STORE, entry.mar_name), os.path.join(store, entry.mar_name))
    server = TorchServe.from_catalog(os.path.join(workdir, "server"), catalog, store)
    settings = {"served": catalog_registration(entry),
                "latency": {**catalog_registration(entry), **LATENCY_SETTINGS}}
    out: Dict[str, Dict[str, dict]] = {}
    paired: Dict[str, dict] = {}
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
                    if label == "latency":
                        paired[name] = paired_rounds(pipeline, values[name], url, body, CONTENT_TYPES[entry.family],
                                                     token, PAIRED_ROUNDS)
                        log(f"paired {name}: in-process {paired[name]['in_process_p50_ms']:.1f} ms, served "
                            f"{paired[name]['served_p50_ms']:.1f} ms, difference {paired[name]['gap_p50_ms']:+.1f} ms")
            finally:
                unregister(server, entry.name)
        floor = echo_floor(server, store, seconds, workdir)
    finally:
        server.stop()
    return out, paired, floor


def report(entry, in_process: Dict[str, float], served: Dict[str, Dict[str, dict]],
           paired: Dict[str, dict], torchserve_alone: dict) -> dict:
    rows = []
    for name, floor in in_process.items():
        row = {"input": name, "in_process_p50_ms": round(floor, 2)}
        if name in paired:
            row["paired"] = paired[name]
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
            "rows": rows, "ratios": ratios, "torchserve_alone": torchserve_alone}


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
    paired_rows = [row for row in result["rows"] if "paired" in row]
    if paired_rows:
        lines += ["", f"Paired rounds, latency setting ({paired_rows[0]['paired']['rounds']} rounds: the handler in "
                  "this process, then the same input served, one after the other):", "",
                  "| input | in-process p50 | served p50 | served - in-process (median of rounds) |",
                  "|---|---:|---:|---:|"]
        for row in paired_rows:
            pair = row["paired"]
            lines.append(f"| {row['input']} | {pair['in_process_p50_ms']:.1f} ms | {pair['served_p50_ms']:.1f} ms | "
                         f"{pair['gap_p50_ms']:+.1f} ms |")
    alone = result.get("torchserve_alone") or {}
    if alone.get("p50_ms") is not None:
        lines += ["", f"TorchServe alone (echo handler, no model, batch 1, one connection): p50 {alone['p50_ms']:.2f} ms, "
                  f"p99 {alone['p99_ms']:.2f} ms."]
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
        pipeline = in_process_pipeline(entry, workdir)
        values = {name: worker_value(body, CONTENT_TYPES[entry.family]) for name, body in bodies.items()}
        in_process = in_process_p50(pipeline, values, args.repeats)
        for name, p50 in in_process.items():
            log(f"in-process {name}: p50 {p50:.1f} ms")
        served, paired, alone = served_p50(entry, catalog, bodies, args.seconds, workdir, pipeline, values)
    result = report(entry, in_process, served, paired, alone)
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
