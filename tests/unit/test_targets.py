"""scripts/bench/targets.py: every target of the performance issue gets a row with its figure, and
"met" follows the goal; a missing input (no tuned profile, no single-request run) gives "-", not a
missing row."""
import pytest

from models.catalog import load_catalog
from models.families import FOUNDATION_MODEL
from scripts.bench import targets


def _row(variant, archive, served, in_process, ceiling="in-process", over=None, unit="img"):
    return {"variant": variant, "archive": archive, "ceiling": ceiling,
            "served": {"throughput_items_s": served, "unit": unit}, "in_process": {"throughput_items_s": in_process},
            "served_over_ceiling": over if over is not None else round(served / in_process, 3)}


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def bench():
    return {"started": "2026-12-06T20:00:00+00:00", "machine": "test machine",
            "variants": {"d": {"throughput_items_s": 30.0}}, "echo_ceiling": {"throughput_items_s": 6000.0},
            "archive_variants": {
                FOUNDATION_MODEL: [_row("fp32", f"{FOUNDATION_MODEL}.mar", 45.0, 48.0),
                                   _row("onnx", f"{FOUNDATION_MODEL}_onnx.mar", 160.0, 165.0)],
                "digits": [_row("fp32", "digits.mar", 5000.0, 9000.0, "echo", over=0.83, unit="img")]}}


SINGLE = {"machine": "test machine",
          "rows": [{"input": "china.jpg", "in_process_p50_ms": 14.0, "served_p50_ms": 36.0,
                    "served_minus_in_process_ms": 22.0, "latency_p50_ms": 15.5, "latency_minus_in_process_ms": 1.5}],
          "ratios": {"served_p50_ms: 12 MP phone photo / china.jpg": 2.4,
                     "latency_p50_ms: 12 MP phone photo / china.jpg": 4.1,
                     "in_process_p50_ms: 12 MP phone photo / china.jpg": 4.3}}


def test_every_target_has_a_row_and_met_follows_the_goal(catalog):
    result = targets.targets(bench(), SINGLE, None, catalog)
    rows = {r["target"]: r for r in result["rows"]}
    best = rows["best served variant / stock (d), same run"]
    assert best["measured"] == round(160 / 30, 2) and best["met"] is True and "onnx" in best["detail"]
    tuned = rows["tuned pick / stock (d) (make tune, same machine)"]
    assert tuned["measured"] is None and tuned["met"] is None and "no tuned profile" in tuned["detail"]
    fp32 = rows[f"{FOUNDATION_MODEL}.mar: served / min(echo, in-process)"]
    assert fp32["goal"] == ">= 0.97" and fp32["met"] is False  # 45/48 = 0.9375, the catalog's goal
    onnx = rows[f"{FOUNDATION_MODEL}_onnx.mar: served / min(echo, in-process)"]
    assert onnx["goal"] == ">= 0.97" and onnx["met"] is True  # a variant is held to its model's goal
    digits = rows["digits.mar: served / min(echo, in-process)"]
    assert digits["goal"] == ">= 0.9" and digits["met"] is False and "echo 6000.0" in digits["detail"]
    gap = rows["concurrency 1: served p50 - in-process p50 (latency setting)"]
    assert gap["measured"] == 1.5 and gap["met"] is True  # without paired rounds: the wrk row
    paired = {**SINGLE, "torchserve_alone": {"p50_ms": 1.1},
              "rows": [{**SINGLE["rows"][0], "paired": {"rounds": 60, "in_process_p50_ms": 14.2,
                                                         "served_p50_ms": 17.4, "gap_p50_ms": 3.1}}]}
    gap = next(r for r in targets.targets(bench(), paired, None, catalog)["rows"] if r["target"].startswith("concurrency"))
    assert gap["measured"] == 3.1 and gap["met"] is False and "60 paired rounds" in gap["detail"]
    assert "TorchServe alone (echo, batch 1) p50 1.10 ms" in gap["detail"]
    phone = rows["12 MP JPEG served p50 / china.jpg served p50"]
    assert phone["measured"] == 2.4 and phone["met"] is False
    assert rows["GPU: served end to end at concurrency 256"]["met"] is None


def test_a_tuned_pick_is_compared_with_the_same_stock_row(catalog):
    profile = {"key": "k", "created": "now", "models": {FOUNDATION_MODEL: {"throughput": {
        "archive": f"{FOUNDATION_MODEL}_onnx.mar", "batch_size": 8, "max_batch_delay_ms": 20, "workers": 1,
        "threads": 2, "throughput": 165.0, "p50_ms": 90.0, "p99_ms": 200.0, "concurrency": 16}}}}
    result = targets.targets(bench(), None, profile, catalog)
    tuned = next(r for r in result["rows"] if r["target"].startswith("tuned pick"))
    assert tuned["measured"] == 5.5 and tuned["met"] is True
    missing = [r for r in result["rows"] if "single-request" in r["detail"]]
    assert len(missing) == 2 and all(r["measured"] is None for r in missing)
    text = targets.markdown(result)
    assert "tuned profile `k`" in text and text.count("\n| ") == len(result["rows"]) + 1


def test_without_a_bench_run_it_says_what_to_run(catalog):
    with pytest.raises(SystemExit, match="run `make bench` first"):
        targets.targets(None, None, None, catalog)
