"""Device placement and AMP on CUDA; skipped where no GPU is available."""
import pytest
import torch

from tests.ts_harness import infer, load_service

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU available")]


def test_handler_runs_on_the_gpu_torchserve_assigns(extracted_archives, samples):
    service = load_service(extracted_archives["efficientnet_lite0"], batch_size=4, gpu_id=0)
    handler = service._entry_point.__self__
    assert handler.device == torch.device("cuda:0")
    assert next(handler.run_model.model.parameters()).device.type == "cuda"
    results = infer(service, [("body", "image/jpeg", photo) for photo in samples.photo_bytes()])
    assert [status for status, _ in results] == [200, 200]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_autocast_on_cuda_keeps_the_top1(extracted_archives, samples, tmp_path, dtype):
    from tests.handler.test_handler import copy_with_config
    folder = copy_with_config(extracted_archives["digits"], tmp_path / "digits",
                              lambda c: c["handler"]["runtime"].update(dtype=dtype))
    fp32 = load_service(extracted_archives["digits"], gpu_id=0)
    amp = load_service(folder, gpu_id=0)
    _, _, images, _ = samples.digits_split()
    requests = [("body", "image/png", samples.png_bytes(p)) for p in images[:8]]
    top1 = lambda service: [out[0]["index"] for _, out in infer(service, requests)]
    assert top1(amp) == top1(fp32)
