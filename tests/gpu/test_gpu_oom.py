"""Out-of-memory splitting on a real GPU: the memory available to this process is limited with
torch.cuda.set_per_process_memory_fraction so that a big batch really runs out; skipped without CUDA."""
import pytest
import torch

from handler_kit import runtime
from handler_kit.oom import OutOfMemory, run_with_oom_split

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU available")]

MiB = 1 << 20


@pytest.fixture
def gpu():
    device = torch.device("cuda:0")
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    yield device
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    torch.cuda.empty_cache()


def limit_reserved_memory(device: torch.device, limit_bytes: int) -> None:
    """The caching allocator refuses to reserve more than this (all of this process's tensors)."""
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit_bytes / total), device)


def outer_product_sums(weights: torch.Tensor):
    """A model whose memory grows with the batch: (B, N) -> (B, N, K) temporary -> (B, N)."""
    def run(batch: torch.Tensor) -> torch.Tensor:
        return (batch[:, :, None] * weights[None, None, :]).sum(dim=-1)
    return run


def test_a_batch_that_does_not_fit_is_split_and_answered_in_full(gpu):
    n, k = 2048, 8192                      # 64 MiB of temporary per item
    inputs = torch.rand(32, n, device=gpu)  # 2 GiB of temporary for the whole batch
    weights = torch.rand(k, device=gpu)
    expected = inputs * weights.sum()
    limit_reserved_memory(gpu, torch.cuda.memory_reserved(gpu) + 768 * MiB)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # the limit is real
        outer_product_sums(weights)(inputs)
    told = []
    run = run_with_oom_split(outer_product_sums(weights), inputs, on_oom=told.append)
    assert told[0] == 32 and run.errors == {}
    assert run.ran == list(range(32))
    torch.testing.assert_close(run.outputs, expected, rtol=1e-4, atol=1e-2)


def test_a_request_too_big_alone_fails_with_503_and_the_gpu_stays_usable(gpu):
    n, k = 4096, 65536                     # 1 GiB of temporary for a single item
    inputs = torch.rand(4, n, device=gpu)
    weights = torch.rand(k, device=gpu)
    allocated = torch.cuda.memory_allocated(gpu)
    limit_reserved_memory(gpu, torch.cuda.memory_reserved(gpu) + 512 * MiB)
    run = run_with_oom_split(outer_product_sums(weights), inputs, on_oom=None)
    assert run.outputs is None and sorted(run.errors) == [0, 1, 2, 3]
    assert all(isinstance(e, OutOfMemory) and e.status == 503 for e in run.errors.values())
    assert torch.cuda.memory_allocated(gpu) == allocated  # nothing left behind by the failures
    small = outer_product_sums(weights[:1024])(inputs)    # and smaller work still runs
    assert small.shape == (4, n)


def test_resnet18_batch_is_split_under_a_memory_limit(gpu, monkeypatch):
    """The handler's own eager runner: a batch of 64 under a limit that holds about 8 images'
    activations; every image still gets the logits it gets unconstrained."""
    import torchvision
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # same numbers at any batch size
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=1000).to(gpu).eval()
    runner = runtime.EagerRunner(model, gpu, "float32", compile_model=False)
    inputs = torch.rand(64, 3, 224, 224, device=gpu)
    expected = torch.cat([runner(inputs[i:i + 8]) for i in range(0, 64, 8)])
    torch.cuda.synchronize(gpu)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(gpu)
    runner(inputs[:8])
    peak_for_8 = torch.cuda.max_memory_reserved(gpu)
    torch.cuda.empty_cache()
    limit_reserved_memory(gpu, int(peak_for_8 * 1.5))
    told = []
    run = run_with_oom_split(runner, inputs, on_oom=told.append)
    assert told and told[0] == 64 and run.errors == {}
    assert run.outputs.shape == (64, 1000)
    torch.testing.assert_close(run.outputs, expected, rtol=1e-2, atol=1e-2)
