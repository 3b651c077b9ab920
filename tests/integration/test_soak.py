"""A short soak (scripts/drills/soak.py) on a TorchServe of its own: concurrency 32, good and bad inputs
mixed across every served model. Nothing unexpected may come back, no worker may restart, and no
worker's resident memory may grow by 10% or more after the warm-up."""
import pytest

from scripts.drills import soak
from models.catalog import load_catalog

pytestmark = pytest.mark.integration

MEASURED_S = 40
WARMUP_S = 10
CONCURRENCY = 32


@pytest.fixture(scope="module")
def report(model_store, torchserve_factory):
    catalog = load_catalog()
    models = soak.soak_models(catalog, None)
    # as `python -m scripts.drills.soak --start` serves them: each model's default version, catalog settings
    with torchserve_factory.start("ts-soak", models=models, catalog=catalog, store=model_store,
                                  ready_timeout=600) as server:
        result = soak.run_soak(server.client, soak.request_mix(models, catalog), MEASURED_S, CONCURRENCY, WARMUP_S)
    print(soak.summary(result))
    return result


def test_every_answer_is_the_expected_one_and_no_worker_restarts(report):
    unexpected = {**report["warmup"]["unexpected_errors"], **report["unexpected_errors"]}
    examples = {**report["warmup"]["unexpected_examples"], **report["unexpected_examples"]}
    assert not unexpected, "\n".join(f"{k} x{v}: {examples.get(k)}" for k, v in unexpected.items())
    assert not report["restarted_workers"]
    # both kinds of traffic really went through
    assert report["good_answered"] > 0 and report["expected_errors"]


def test_worker_memory_grows_under_10_percent_after_warm_up(report):
    assert report["memory"], "no worker memory was measured"
    for row in report["memory"]:
        assert row["growth_pct"] is not None, f"{row['model']} worker {row['pid']} was gone at the end"
        assert row["growth_pct"] < 100 * soak.MAX_MEMORY_GROWTH, row
