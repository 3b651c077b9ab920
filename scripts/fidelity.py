"""The build-time fidelity gate: a variant is measured against its fp32 model, through the same
runtime code the handler uses, and refused when it costs more than the catalog allows.

  accuracy   digits: held-out accuracy of both; refuse a drop above max_drop_points (default 0.5)
  agreement  photographs: top-1 agreement with fp32 and mean cosine similarity of the logits on
             `images` (>= 64) deterministic views; defaults 0.98 and 0.99
"""
import torch
import torch.nn.functional as F



class FidelityError(RuntimeError):
    pass


def run_all(runner, inputs: torch.Tensor, channels_last: bool, batch_size: int = 32) -> torch.Tensor:
    outputs = []
    for chunk in inputs.split(batch_size):
        if channels_last:
            chunk = chunk.contiguous(memory_format=torch.channels_last)
        outputs.append(runner(chunk).float().cpu())
    return torch.cat(outputs)


def evaluation_data(fidelity: dict, image: dict):
    """(inputs, labels or None) the metric is computed on."""
    from models import variants
    if fidelity["metric"] == "accuracy":
        return variants.digits_heldout(image)
    count = int(fidelity.get("images", 64))
    if count < 64:
        raise FidelityError(f"fidelity.images is {count}; at least 64 images are required")
    return variants.photo_fidelity_set(image, count), None


def measure(fidelity: dict, reference_logits: torch.Tensor, logits: torch.Tensor, labels) -> dict:
    """Figures of one variant against the fp32 reference."""
    figures = {"metric": fidelity["metric"], "samples": int(logits.shape[0]),
               "top1_agreement": round((logits.argmax(1) == reference_logits.argmax(1)).float().mean().item(), 4),
               "mean_cosine": round(F.cosine_similarity(logits, reference_logits, dim=1).mean().item(), 5)}
    if labels is not None:
        accuracy = (logits.argmax(1) == labels).float().mean().item()
        reference = (reference_logits.argmax(1) == labels).float().mean().item()
        figures.update(accuracy=round(accuracy, 4), fp32_accuracy=round(reference, 4),
                       accuracy_drop_points=round(100 * (reference - accuracy), 2))
    return figures


def check(fidelity: dict, figures: dict, name: str) -> None:
    """Raise FidelityError with what failed and by how much."""
    if fidelity["metric"] == "accuracy":
        limit = float(fidelity.get("max_drop_points", 0.5))
        if figures["accuracy_drop_points"] > limit:
            raise FidelityError(
                f"{name}: held-out accuracy {figures['accuracy']:.2%} is {figures['accuracy_drop_points']} "
                f"points below fp32's {figures['fp32_accuracy']:.2%} (allowed: {limit}); not packaged")
        return
    agreement_min = float(fidelity.get("min_top1_agreement", 0.98))
    cosine_min = float(fidelity.get("min_cosine", 0.99))
    problems = []
    if figures["top1_agreement"] < agreement_min:
        problems.append(f"top-1 agreement with fp32 {figures['top1_agreement']} < {agreement_min}")
    if figures["mean_cosine"] < cosine_min:
        problems.append(f"mean logit cosine {figures['mean_cosine']} < {cosine_min}")
    if problems:
        raise FidelityError(f"{name}: {'; '.join(problems)} on {figures['samples']} images; not packaged")
