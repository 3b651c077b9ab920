"""The performance targets, each with its measured figure, from one `make bench` run (its latest.json,
the single-request rows of the same run) and this machine's tuned profile (`make tune`).

    python -m scripts.bench.targets     # build/bench/targets.json and targets.md (make bench runs it)

A target whose figures are missing (no tuned profile yet, a failed row) is listed with "-" and
why, never left out: the table is the note's list of targets, met or not.
"""
import json
import os
import sys
from typing import List, Optional

from models.catalog import ROOT, load_catalog
from models.families import FOUNDATION_MODEL
from scripts.bench.measure import RESULTS_DIR
from scripts.serving import tuned_profile as tp

BENCH_JSON = os.path.join(RESULTS_DIR, "latest.json")
SINGLE_JSON = os.path.join(RESULTS_DIR, "single_request.json")
OUT_JSON = os.path.join(RESULTS_DIR, "targets.json")
OUT_MD = os.path.join(RESULTS_DIR, "targets.md")
PHONE_RATIO = "served_p50_ms: 12 MP phone photo / china.jpg"
GPU_NOTE = "no GPU lent to this session: scripts/gpu_check.sh is ready, its figures are owed"


def _load(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _row(target: str, goal: str, value: Optional[float], met: Optional[bool], detail: str) -> dict:
    return {"target": target, "goal": goal, "measured": value, "met": met, "detail": detail}


def _served(row: Optional[dict]) -> Optional[float]:
    served = (row or {}).get("served") or {}
    return None if served.get("failure") else served.get("throughput_items_s")


def _archive_rows(bench: dict, model: str) -> List[dict]:
    return (bench.get("archive_variants") or {}).get(model) or []


def stock_ratio_rows(bench: dict, profile: Optional[dict]) -> List[dict]:
    """Tuned best served / stock image_classifier with (b)'s batching (d), >= 5x."""
    stock = ((bench.get("variants") or {}).get("d") or {}).get("throughput_items_s")
    rows = _archive_rows(bench, FOUNDATION_MODEL)
    best = max(((_served(r), r["variant"]) for r in rows if _served(r)), default=(None, None))
    out = [_row("best served variant / stock (d), same run", ">= 5x",
                round(best[0] / stock, 2) if best[0] and stock else None,
                bool(best[0] and stock and best[0] / stock >= 5),
                f"{best[1]} {best[0]} img/s / (d) {stock} img/s" if best[0] and stock else "bench rows missing")]
    pick = (((profile or {}).get("models") or {}).get(FOUNDATION_MODEL) or {}).get("throughput")
    if pick and stock:
        value = pick["throughput"] / stock
        out.append(_row("tuned pick / stock (d) (make tune, same machine)", ">= 5x", round(value, 2), value >= 5,
                        f"{tp.describe_pick(pick)} / (d) {stock} img/s"))
    else:
        out.append(_row("tuned pick / stock (d) (make tune, same machine)", ">= 5x", None, None,
                        "no tuned profile for this machine" if not pick else "no (d) row"))
    return out


def served_goal_rows(bench: dict, catalog) -> List[dict]:
    """Every benchmarked archive: served / min(echo ceiling, in-process rate) against its model's
    tuning.served_goal (the catalog). For a heavy model the in-process rate is the lower bound, so
    this is served / in-process on the same variant and batch; for a light one, the echo ceiling."""
    out, defaults = [], {m.name: m for m in catalog.models if m.is_default}
    for model, rows in (bench.get("archive_variants") or {}).items():
        goal = ((defaults[model].tuning or {}) if model in defaults else {}).get("served_goal")
        for row in rows:
            value = row.get("served_over_ceiling")
            unit = ((row.get("served") or {}).get("unit")) or "items"
            bound = (row.get("in_process") or {}).get("throughput_items_s") if row.get("ceiling") == "in-process" \
                else (bench.get("echo_ceiling") or {}).get("throughput_items_s")
            out.append(_row(f"{row['archive']}: served / min(echo, in-process)",
                            "-" if goal is None else f">= {goal:g}", value,
                            None if value is None or goal is None else value >= goal,
                            f"{_served(row)} {unit}/s over {row.get('ceiling')} {bound}"))
    return out


def single_request_rows(single: Optional[dict]) -> List[dict]:
    if not single:
        missing = "no single-request run (python -m scripts.bench.single_request)"
        return [_row("concurrency 1: served p50 - in-process p50 (latency setting)", "<= 2 ms", None, None, missing),
                _row("12 MP JPEG served p50 / china.jpg served p50", "<= 1.6x", None, None, missing)]
    china = next(r for r in single["rows"] if r["input"] == "china.jpg")
    paired = china.get("paired")
    # Paired rounds (in-process and served alternately) when the run has them: drift cancels out.
    gap = paired["gap_p50_ms"] if paired else china.get("latency_minus_in_process_ms")
    alone = (single.get("torchserve_alone") or {}).get("p50_ms")
    ratio = single["ratios"].get(PHONE_RATIO)
    latency_ratio = single["ratios"].get("latency_p50_ms: 12 MP phone photo / china.jpg")
    floor = single["ratios"].get("in_process_p50_ms: 12 MP phone photo / china.jpg")
    return [
        _row("concurrency 1: served p50 - in-process p50 (latency setting)", "<= 2 ms", gap,
             None if gap is None else gap <= 2,
             (f"china.jpg, {paired['rounds']} paired rounds: served {paired['served_p50_ms']} ms vs in-process "
              f"{paired['in_process_p50_ms']} ms" if paired else
              f"china.jpg: {china.get('latency_p50_ms')} ms served (batch 1) vs {china['in_process_p50_ms']} ms "
              "in-process")
             + (f"; TorchServe alone (echo, batch 1) p50 {alone:.2f} ms" if alone is not None else "")
             + f"; throughput setting (wrk) {china.get('served_minus_in_process_ms')} ms"),
        _row("12 MP JPEG served p50 / china.jpg served p50", "<= 1.6x", ratio, None if ratio is None else ratio <= 1.6,
             f"latency setting {latency_ratio}x; in-process (the floor) {floor}x")]


def targets(bench: Optional[dict], single: Optional[dict], profile: Optional[dict], catalog) -> dict:
    if bench is None:
        raise SystemExit(f"{os.path.relpath(BENCH_JSON, ROOT)} is missing: run `make bench` first")
    rows = (stock_ratio_rows(bench, profile) + served_goal_rows(bench, catalog)
            + single_request_rows(single)
            + [_row("GPU: served end to end at concurrency 256", ">= 4,000 img/s, p99 < 150 ms", None, None, GPU_NOTE)])
    return {"bench_started": bench.get("started"), "machine": bench.get("machine"),
            "single_request_machine": (single or {}).get("machine"),
            "profile": (profile or {}).get("key"), "profile_created": (profile or {}).get("created"),
            "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"`make bench` of {result['bench_started']} on {result['machine']}"
             + (f"; tuned profile `{result['profile']}` of {result['profile_created']}" if result["profile"] else
                "; no tuned profile") + ":", "",
             "| target | goal | measured | met | from |", "|---|---|---:|---|---|"]
    for row in result["rows"]:
        met = {True: "yes", False: "**no**", None: "-"}[row["met"]]
        value = "-" if row["measured"] is None else f"{row['measured']:g}"
        lines.append(f"| {row['target']} | {row['goal']} | {value} | {met} | {row['detail']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    catalog = load_catalog()
    key = tp.profile_key(tp.machine_facts())
    profile_file = tp.profile_path(key)
    profile = tp.load_profile(profile_file) if os.path.isfile(profile_file) else None
    result = targets(_load(BENCH_JSON), _load(SINGLE_JSON), profile, catalog)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(OUT_JSON, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    text = markdown(result)
    with open(OUT_MD, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
