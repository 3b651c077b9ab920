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
to every input checked one request at a time (Python), then loaded by wrk (scripts/bench/loadgen.py: C,
one event-loop thread, --concurrency keep-alive connections, every input in turn, the token in an
Authorization header) for --warmup seconds, unreported, and --seconds measured; then unregistered.
Only 2xx answers count; the rest are reported as errors. Beside each served row the bench reports
the CPU the client itself used (wrk's user + system seconds over its wall seconds, in cores) and
what other programs used. Without wrk the served rows fail, naming the command that installs it
(scripts/ensure_loadgen.sh); `--client python` measures them with the earlier client (Python
threads in this process, competing with the server for the cores) for a comparison.
A row that fails (an archive that does not load, say) is reported as failed and the others still run.

The first served row is the echo ceiling: echo.mar, built here from scripts/bench/echo_handler.py (a
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
import os
import platform
import shutil
import tempfile
import time
from datetime import datetime, timezone
from typing import Dict, List, Sequence

import torch

from models.catalog import FAMILIES, MODEL_STORE, Catalog, load_catalog
from scripts.bench import loadgen
from scripts.bench.in_process_rows import measure_in_process
from scripts.bench.measure import INPUTS, ITEM_UNITS, MODEL, RESULTS_DIR, ROOT, Measurement, attempt, log
from scripts.bench.plan import ALL_VARIANTS, in_process_plan, plan_variant_tables, served_plan
from scripts.bench.report import machine_description, markdown, package_version, ratios, variant_report, write_results
from scripts.bench.served import CLIENTS, echo_variant, run_served


# -- main ----------------------------------------------------------------------------------------
def parse_args(argv, variant_names: Sequence[str]):
    parser = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__.split("\n\n")[0])
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
              "torch": torch.__version__, "onnxruntime": package_version("onnxruntime"),
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
