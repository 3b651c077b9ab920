"""The bad-input corpus (scripts/drills/bad_inputs.py) against a real TorchServe: every case alone, then
every case mixed into server-side batches of good requests, whose answers must not change; no
worker may restart (pids from the management API's describe)."""
import dataclasses
import io
import itertools
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from scripts.drills import bad_inputs
from models.catalog import load_catalog

pytestmark = pytest.mark.integration

CATALOG = load_catalog()
COVERAGE = bad_inputs.coverage(CATALOG)
CASES = bad_inputs.cases(COVERAGE["run"], CATALOG)
BATCH_SIZE = 8
CASES_PER_BATCH = 4  # the rest of each server-side batch is good requests
# Long enough that the requests of one round, sent together, always share one server-side batch.
BATCH_DELAY_MS = 3000


def batched(model: str) -> str:
    return f"{model}_batched"


@pytest.fixture(scope="module")
def server(model_store, torchserve_factory):
    """The catalog's served models (default versions, catalog settings) and a copy of each with
    a long batch delay, so that requests sent together share one server-side batch."""
    models = []
    for name in COVERAGE["run"]:
        entry = CATALOG.model(name)
        models += [entry, (entry.mar_name, dict(model_name=batched(name), batch_size=BATCH_SIZE,
                                                max_batch_delay=BATCH_DELAY_MS, initial_workers=1,
                                                response_timeout=entry.serving["responseTimeout"]))]
    with torchserve_factory.start("ts-bad-inputs", models=models, catalog=CATALOG, store=model_store,
                                  ready_timeout=300) as ts:
        yield ts


def served_names():
    return [n for m in COVERAGE["run"] for n in (m, batched(m))]


@pytest.fixture(scope="module")
def started_pids(server):
    return bad_inputs.worker_pids(server.client, served_names())


@pytest.fixture(scope="module")
def references(server):
    """(model, body, content type) -> the model's answer to it alone, each asked once."""
    answers = {}

    def answer(model, body, content_type):
        key = (model, body, content_type)
        if key not in answers:
            outcome = bad_inputs.send(server.client, model, body, content_type)
            assert outcome.status == 200, f"{model}: a reference/good input was answered {outcome.status}: " \
                                          f"{outcome.message}"
            answers[key] = outcome.answer
        return answers[key]
    return answer


def case_reference(references, case):
    return None if case.reference is None else references(case.model, case.reference,
                                                          case.reference_content_type)


def test_every_served_model_has_cases_and_every_case_a_served_model():
    """Nothing silently stops being tested: a model the catalog serves needs cases, and cases
    of a model the catalog stops serving fail here unless the model is declared pending."""
    assert not COVERAGE["missing"], "\n".join(COVERAGE["missing"])
    assert COVERAGE["run"], "the catalog serves no model with cases"


def test_a_model_dropped_from_the_catalog_or_served_without_cases_is_reported_missing(monkeypatch):
    served = CATALOG.loaded_at_start
    dropped = served[0].name
    without = dataclasses.replace(CATALOG, models=[m for m in CATALOG.models if m.name != dropped])
    assert any(repr(dropped) in line for line in bad_inputs.coverage(without)["missing"])
    monkeypatch.setattr(bad_inputs, "PENDING_MODELS", (dropped,))
    assert bad_inputs.coverage(without)["pending"] == [dropped]
    extra = dataclasses.replace(CATALOG, models=CATALOG.models + [dataclasses.replace(served[0], name="newnet")])
    assert any("'newnet'" in line for line in bad_inputs.coverage(extra)["missing"])


def test_the_corpus_covers_every_model_and_says_what_each_case_expects():
    everything = bad_inputs.cases(catalog=CATALOG)
    assert len(everything) >= 25 and {c.model for c in everything} == set(bad_inputs.CASE_BUILDERS)
    for case in everything:
        assert case.status == 200 or case.message or case.name == "over_max_request_size", case.label
        assert case.status != 200 or case.checks, case.label
    bomb = next(c for c in everything if c.name == "decompression_bomb_png")
    assert len(bomb.body) < 1000 and struct.unpack(">II", bomb.body[16:24]) == (30000, 30000)  # IHDR


@pytest.mark.parametrize("case", CASES, ids=[f"{c.model}-{c.name}" for c in CASES])
def test_case_alone(server, started_pids, references, case):
    before = bad_inputs.worker_pids(server.client, [case.model])
    reference = case_reference(references, case)
    outcome = bad_inputs.send(server.client, case.model, case.body, case.content_type)
    after = bad_inputs.worker_pids(server.client, [case.model])
    if after != before:
        server.client.wait_ready([case.model], 300)  # let the next case find a live worker
    problem = bad_inputs.judge(case, outcome, reference)
    assert problem is None, f"{case.label} ({case.what}): {problem}"
    assert after == before, f"{case.label}: the worker restarted (pids {before} -> {after})"


def rounds(cases, goods, cases_per_batch: int, batch_size: int):
    """Batches of ``batch_size`` requests: up to ``cases_per_batch`` cases at odd positions, good
    requests (cycled) everywhere else."""
    good_requests = itertools.cycle(goods)
    for start in range(0, len(cases), cases_per_batch):
        chunk = list(cases[start:start + cases_per_batch])
        yield [chunk.pop(0) if position % 2 == 1 and chunk else next(good_requests)
               for position in range(batch_size)] + chunk


def send_together(client, model, requests):
    """All requests at once (a barrier releases them together), answers in request order."""
    barrier = threading.Barrier(len(requests))

    def one(request):
        barrier.wait()
        return bad_inputs.send(client, model, request.body, request.content_type)

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(one, requests))


@pytest.mark.parametrize("model", COVERAGE["run"])
def test_cases_mixed_into_batches_of_good_requests(server, started_pids, references, model):
    goods = bad_inputs.good_requests(model, CATALOG)
    alone = {g.name: references(model, g.body, g.content_type) for g in goods}
    selected = [c for c in CASES if c.model == model]
    case_references = {c.name: case_reference(references, c) for c in selected}
    before = bad_inputs.worker_pids(server.client, [model, batched(model)])
    problems = []
    for batch in rounds(selected, goods, CASES_PER_BATCH, BATCH_SIZE):
        outcomes = send_together(server.client, batched(model), batch)
        names = ", ".join(r.name for r in batch if isinstance(r, bad_inputs.Case))
        for request, outcome in zip(batch, outcomes):
            if isinstance(request, bad_inputs.Case):
                problem = bad_inputs.judge(request, outcome, case_references[request.name])
            else:
                problem = bad_inputs.judge_good(request, outcome, alone[request.name])
            if problem:
                problems.append(f"{model}/{request.name} (batch with {names}): {problem}")
    after = bad_inputs.worker_pids(server.client, [model, batched(model)])
    assert not problems, f"{len(problems)} wrong answers:\n" + "\n".join(problems)
    assert after == before, f"workers restarted: {before} -> {after}"


@pytest.mark.skipif("digits" not in COVERAGE["run"], reason="digits is not served")
def test_the_exif_cases_catch_an_ignored_orientation(server):
    """Without its EXIF tag, the stored (turned) digit is another digit: the EXIF cases can fail."""
    for case in [c for c in CASES if c.model == "digits" and c.name.startswith("exif_orientation_")]:
        stored = Image.open(io.BytesIO(case.body)).convert("L")  # PIL leaves the pixels as stored
        buffer = io.BytesIO()
        stored.save(buffer, format="JPEG", quality=95)
        outcome = bad_inputs.send(server.client, "digits", buffer.getvalue(), bad_inputs.JPEG)
        expected = [c.value for c in case.checks if c.kind == "label"][0]
        assert outcome.status == 200 and outcome.answer[0]["label"] != expected, case.name


def test_no_worker_restarted(server, started_pids):
    assert bad_inputs.worker_pids(server.client, served_names()) == started_pids
