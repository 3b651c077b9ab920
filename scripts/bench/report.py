"""The bench's ratios, variants tables and markdown, and build/bench/latest.json and .md."""
import contextlib
import json
import os
import platform
from typing import Dict, List, Optional, Sequence

from handler_kit import runtime
from handler_kit.image_config import parse_image_classifier
from models.catalog import MODEL_STORE, ModelEntry
from models.families import FAMILIES as FAMILY_DECLARATIONS
from models.families import resolve
from scripts.bench.in_process_rows import read_model_config
from scripts.bench.measure import (ECHO_KEY, ECHO_MODEL, FOREIGN_CPU_WARNING, ITEM_NOUNS, RESULTS_DIR, TITLES,
                                   Measurement, fmt_number, rounded)
from scripts.bench.plan import ALL_VARIANTS, VariantTable
from scripts.build.fidelity import rules_of

# (numerator, denominator) -> the lowest acceptable throughput ratio, None where there is none.
RATIO_TARGETS = {("b", "a"): 0.85, ("b", "d"): 1.2, ("b", "c"): None}


# -- report --------------------------------------------------------------------------------------
def ratio(numerator: Optional[Measurement], denominator: Optional[Measurement]) -> Optional[float]:
    if numerator is None or denominator is None or numerator.failure or denominator.throughput <= 0:
        return None
    return numerator.throughput / denominator.throughput


def ratios(results: Dict[str, Measurement]) -> List[dict]:
    out = []
    for (num, den), target in RATIO_TARGETS.items():
        value = ratio(results.get(num), results.get(den))
        out.append({"ratio": f"({num})/({den})", "value": rounded(value, 3), "target": target,
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
            "served_over_in_process": rounded(ratio(served, in_process), 3),
            "speed_vs_fp32_served": rounded(ratio(served, fp32_served), 3),
            "speed_vs_fp32_in_process": rounded(ratio(in_process, fp32_in_process), 3),
            # served throughput / min(echo ceiling, in-process rate): how close to what it could reach
            "served_over_ceiling": rounded(reached, 3), "ceiling": bound_of,
            "fidelity": archive_fidelity(row.entry, handler)})
    return report


def fidelity_cell(metric: str, figures: dict) -> str:
    return rules_of(metric).cell(figures)


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
            lines.append(f"| {TITLES[key]} | {_throughput(r)} | {fmt_number(r.percentile(50))} | "
                         f"{fmt_number(r.percentile(99))} | {_errors(r)} |")
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
             f"{rules_of(table.metric).header} |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row, figures in zip(table.rows, report):
        in_process, served = results.get(row.in_process_key), results.get(row.served_key)
        lines.append(
            f"| {row.entry.variant} ({figures['runtime']}) | {_throughput(in_process)} | "
            f"{_throughput(served)} | {fmt_number(served.percentile(50) if served else None)} | "
            f"{fmt_number(served.percentile(99) if served else None)} | "
            f"{fmt_number(figures['served_over_in_process'], 2)} | {ceiling_cell(figures)} | "
            f"{fmt_number(figures['speed_vs_fp32_served'], 2)} | {fidelity_cell(table.metric, figures['fidelity'])} |")
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
             f"p50 {fmt_number(echo.percentile(50))} ms, p99 {fmt_number(echo.percentile(99))} ms, "
             f"{_errors(echo)} errors; a handler that answers \"ok\" with no model "
             f"(scripts/bench/echo_handler.py), batch {settings.get('batch_size')}, delay "
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


def package_version(package: str) -> str:
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
