"""KServe capacity: replicas per request rate from the recorded `make bench` figures, the
sheet in docs/deployment-k8s.md."""
import json
import math
import os
from typing import Dict, Sequence

from models.catalog import ROOT, Catalog, ModelEntry
from scripts.deploy.kserve_common import (BENCH_PATH, CAPACITY_DOC, CAPACITY_END, CAPACITY_START, DeployError,
                                   RECORDED_BENCH, deploy_settings, served_entries)


# ---------------------------------------------------------------------------------------------
# Capacity


def replicas_needed(rate: float, per_replica_throughput: float, headroom: float) -> int:
    """Replicas that serve ``rate`` requests/s when one replica serves at most
    ``per_replica_throughput`` and a ``headroom`` fraction of each is kept free (bursts, a
    replica lost or restarting): ceil(rate / (throughput x (1 - headroom))), at least 1."""
    if rate < 0 or per_replica_throughput <= 0 or not 0 <= headroom < 1:
        raise ValueError("need rate >= 0, per_replica_throughput > 0 and 0 <= headroom < 1")
    usable = per_replica_throughput * (1 - headroom)
    return max(1, math.ceil(rate / usable - 1e-9))  # 1e-9: 7 / (10 x 0.7) is not 1.0000000001


def replicas_for_mix(rates: Dict[str, float], throughputs: Dict[str, float], headroom: float) -> int:
    """Replicas for several models sharing each replica: the fractions of a replica each
    model's traffic takes add up."""
    load = sum(rate / throughputs[name] for name, rate in rates.items())
    return replicas_needed(load, 1.0, headroom)


def load_bench(path: str = RECORDED_BENCH) -> dict:
    if not os.path.exists(path):
        hint = "run `make bench` first" if os.path.abspath(path) == BENCH_PATH else \
            "record one with `python -m scripts.deploy.kserve --record-bench build/bench/latest.json`"
        raise DeployError(f"{os.path.relpath(path, ROOT)} is missing: {hint}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def served_throughputs(bench: dict, entries: Sequence[ModelEntry]) -> Dict[str, float]:
    """Model name -> measured served items/s of the archive it is served with (served models the
    benchmark did not measure, or whose row failed, are left out)."""
    out = {}
    archives = {m.mar_name: m.name for m in entries}
    for rows in (bench.get("archive_variants") or {}).values():
        for row in rows:
            served = row.get("served") or {}
            throughput = served.get("throughput_items_s") or served.get("throughput_img_s")
            if row.get("archive") in archives and throughput and not served.get("failure"):
                out[archives[row["archive"]]] = float(throughput)
    return out


# The header fields of a `make bench` result that the capacity sheet names, and the figures of
# each served row it is made from (scripts/bench/measure.py: Measurement.summary).
BENCH_HEADER = ("started", "machine", "cpu_count", "concurrency", "seconds", "torch", "families")
SERVED_FIGURES = ("unit", "throughput_items_s", "p50_ms", "p99_ms", "items_ok", "measured_s", "errors",
                  "foreign_cpu_cores", "failure")


def recorded_figures(bench: dict, source: str) -> dict:
    """The figures of a `make bench` result that the capacity sheet needs, in the same layout
    (a recorded file can be recorded again): header, and per archive its served row."""
    variants = {}
    for model, rows in (bench.get("archive_variants") or {}).items():
        kept = [{"archive": row["archive"], "variant": row.get("variant"),
                 "served": {k: row["served"][k] for k in SERVED_FIGURES if k in row["served"]}}
                for row in rows if row.get("served")]
        if kept:
            variants[model] = kept
    if not variants:
        raise DeployError(f"{source} holds no served rows (archive_variants): not a `make bench` result?")
    return {"recorded_from": bench.get("recorded_from", source),
            **{k: bench[k] for k in BENCH_HEADER if k in bench}, "archive_variants": variants}


def record_bench(source: str, catalog: Catalog, dest: str = RECORDED_BENCH,
                 doc: str = CAPACITY_DOC) -> dict:
    """Copies the figures of ``source`` to ``dest`` and rewrites the capacity sheet of ``doc``
    from them. Refused when no model served at start has a served figure."""
    bench = load_bench(source)
    figures = recorded_figures(bench, os.path.relpath(os.path.abspath(source), ROOT))
    deploy = deploy_settings(catalog)
    entries = served_entries(catalog)
    block = capacity_markdown(figures, entries, deploy["capacity_rates"], deploy["headroom"])
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(dest, "w", encoding="utf-8") as f:
        json.dump(figures, f, indent=2)
        f.write("\n")
    write_capacity_doc(block, doc)
    return figures


def capacity_markdown(bench: dict, entries: Sequence[ModelEntry], rates: Sequence[float],
                      headroom: float) -> str:
    throughputs = served_throughputs(bench, entries)
    if not throughputs:
        raise DeployError("the benchmark has no served figures for the models served at start")
    head = "| model | archive | served req/s per replica | " + " | ".join(f"{r:g} req/s" for r in rates) + " |"
    lines = [
        f"Replicas needed per request rate, each replica like the benchmark's machine "
        f"({bench.get('machine', '?')}; {bench.get('cpu_count', '?')} cores), "
        f"{headroom:.0%} headroom: replicas = ceil(rate / (throughput x {1 - headroom:g})).",
        f"Throughput: `make bench` of {bench.get('started', '?')}, served through TorchServe at "
        f"concurrency {bench.get('concurrency', '?')}, {bench.get('seconds', '?')} s per row, one item "
        f"per request.", "", head, "|---|---|---:|" + "---:|" * len(rates)]
    for entry in entries:
        if entry.name not in throughputs:
            continue
        cells = [str(replicas_needed(r, throughputs[entry.name], headroom)) for r in rates]
        lines.append(f"| {entry.name} {entry.version} | {entry.mar_name} | {throughputs[entry.name]:.1f} | "
                     + " | ".join(cells) + " |")
    left_out = [m.name for m in entries if m.name not in throughputs]
    if left_out:
        lines += ["", f"Not measured by the benchmark: {', '.join(left_out)}."]
    return "\n".join(lines) + "\n"


def capacity_block(catalog: Catalog, bench_path: str = RECORDED_BENCH) -> str:
    """The capacity sheet as the committed document holds it: from the recorded figures."""
    deploy = deploy_settings(catalog)
    return capacity_markdown(load_bench(bench_path), served_entries(catalog), deploy["capacity_rates"],
                             deploy["headroom"])


def committed_capacity_block(doc: str = CAPACITY_DOC) -> str:
    """What ``doc`` holds between CAPACITY_START and CAPACITY_END (the lines between them)."""
    with open(doc, encoding="utf-8") as f:
        text = f.read()
    if text.count(CAPACITY_START) != 1 or text.count(CAPACITY_END) != 1:
        raise DeployError(f"{os.path.relpath(doc, ROOT)} needs one {CAPACITY_START} and one {CAPACITY_END} line")
    return text.split(CAPACITY_START + "\n", 1)[1].split(CAPACITY_END, 1)[0]


def write_capacity_doc(block: str, doc: str = CAPACITY_DOC) -> None:
    """Replaces what ``doc`` holds between the markers with ``block``; the rest is kept."""
    committed_capacity_block(doc)  # the markers are there, once each
    with open(doc, encoding="utf-8") as f:
        text = f.read()
    before, rest = text.split(CAPACITY_START + "\n", 1)
    after = rest.split(CAPACITY_END, 1)[1]
    with open(doc, "w", encoding="utf-8") as f:
        f.write(before + CAPACITY_START + "\n" + block + CAPACITY_END + after)
