"""The contract every family's handler keeps, run for each model the catalog serves at start
(its family's declaration in models/families.py gives the inputs): the worker is ready only after
its warm-up, good requests are answered, a bad request inside a server-side batch gets its own 4xx
while the others keep the answers they get alone, and describe reports the archive's meta."""
import pytest

from models.families import family_of, resolve, samples_of
from models.catalog import load_catalog
from tests.answers import answers_close
from tests.ts_harness import infer, load_service

SERVED = [m for m in load_catalog().loaded_at_start if m.is_default]


def handler_level_case(entry, catalog):
    """The first bad-input case the handler itself answers with 400 (cases the frontend refuses,
    such as a body over max_request_size, never reach a worker)."""
    limits = family_of(entry).handler_limits(entry.handler_config)
    cases = resolve(samples_of(entry).cases)(entry.name, limits, int(catalog.server["max_request_size"]))
    return next(c for c in cases if c.status == 400 and c.body)


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


@pytest.mark.parametrize("entry", SERVED, ids=[m.name for m in SERVED])
def test_every_family_keeps_the_handler_contract(entry, catalog, extracted_archives):
    service = load_service(extracted_archives[entry.mar_name[:-len(".mar")]], batch_size=8)
    handler = service._entry_point.__self__
    assert handler.initialized  # set only after the warm-up batch was answered

    good = [(g.content_type, g.body) for g in resolve(samples_of(entry).good)(entry.name)][:3]
    assert len(good) >= 2, f"the {entry.family} family declares fewer than 2 good requests"
    alone = [infer(service, [("body", ct, body)])[0] for ct, body in good]
    assert [status for status, _ in alone] == [200] * len(good)

    bad = handler_level_case(entry, catalog)
    mixed = infer(service, [("body", good[0][0], good[0][1]), ("body", bad.content_type, bad.body),
                            *[("body", ct, body) for ct, body in good[1:]]])
    assert [status for status, _ in mixed] == [200, 400] + [200] * (len(good) - 1)
    assert bad.message in mixed[1][1]["message"], (bad.name, mixed[1][1])
    for (_, together), (_, single) in zip(mixed[:1] + mixed[2:], alone):
        assert answers_close(together, single)

    meta = handler.describe_handle()["meta"]
    assert (meta["name"], meta["version"]) == (entry.name, entry.version)
