"""The build-time fidelity gate: a variant is measured against its fp32 model, through the same
runtime code the handler uses, and refused when it costs more than the catalog allows.

  accuracy   held-out accuracy of both on the model's own labelled samples (models/families.py:
             the digits model's held-out digits); refuse a drop above max_drop_points (default 0.5)
  agreement  photographs: top-1 agreement with fp32 and mean cosine similarity of the logits on
             `images` (>= 64) deterministic views; defaults 0.98 and 0.99
  embedding  text: real sentence pairs (models/sentences.py): per-sentence cosine of the variant's
             vectors to fp32's (refuse below min_cosine, default 0.95) and the share of
             (paraphrase pair, unrelated pair) comparisons the paraphrase still wins (refuse below
             min_pair_order, default 1.0); marked lossy when a cosine falls below lossy_below (0.99)
  regression tabular: held-out R^2 of both; refuse a drop above max_r2_drop (default 0.01)
"""
from dataclasses import dataclass
from typing import Callable

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


def photo_views(fidelity: dict, image: dict) -> torch.Tensor:
    """The agreement metric's data: ``images`` (>= 64) deterministic views of the photographs."""
    from models import variants
    count = int(fidelity.get("images", 64))
    if count < 64:
        raise FidelityError(f"fidelity.images is {count}; at least 64 images are required")
    return variants.photo_fidelity_set(image, count)


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


def pair_order(vectors: torch.Tensor, pairs: int, shift: int) -> float:
    """Share of (paraphrase pair, unrelated pair) comparisons where the paraphrase pair is more
    similar. Rows 0..pairs-1 are first sentences, rows pairs..2*pairs-1 their paraphrases."""
    first, second = vectors[:pairs], vectors[pairs:]
    paraphrase = (first * second).sum(1)
    unrelated = (first * second.roll(-shift, dims=0)).sum(1)
    return (paraphrase[:, None] > unrelated[None, :]).float().mean().item()


def text_figures(model_folder: str, handler_config: dict, fidelity: dict) -> dict:
    """The text variant (its runtime section: dtype, quantization) against fp32, on CPU, through
    the handler's own stages."""
    from handler_kit import runtime, text
    from handler_kit.quantization import quantize_dynamic_int8
    from handler_kit.text_config import parse_text_runtime
    from models import sentences

    spec = parse_text_runtime(handler_config.get("runtime"))
    cpu = torch.device("cpu")
    tokenizer, reference = text.load_tokenizer_and_model(model_folder, cpu)
    _, model = text.load_tokenizer_and_model(model_folder, cpu)
    if spec.quantization == "dynamic_int8":
        model = quantize_dynamic_int8(model)
    inputs, _ = text.tokenize_batch(tokenizer, sentences.fidelity_sentences(),
                                    int(handler_config.get("max_length", 256)))
    with torch.inference_mode():
        expected = text.embed(reference, inputs, cpu)
        with runtime.autocast(cpu, spec.dtype):
            vectors = text.embed(model, inputs, cpu)
    cosines = (vectors * expected).sum(1)
    pairs, shift = len(sentences.PARAPHRASES), sentences.UNRELATED_SHIFT
    lossy_below = float(fidelity.get("lossy_below", 0.99))
    return {"metric": "embedding", "samples": int(vectors.shape[0]),
            "min_cosine": round(cosines.min().item(), 5), "mean_cosine": round(cosines.mean().item(), 5),
            "pair_order": round(pair_order(vectors, pairs, shift), 4),
            "fp32_pair_order": round(pair_order(expected, pairs, shift), 4),
            "lossy": bool(cosines.min().item() < lossy_below)}


def tabular_figures(weights_path: str, handler_config: dict, fidelity: dict) -> dict:
    """The tabular variant (its runtime quantization) against fp32 on the held-out split."""
    from handler_kit import tabular
    from handler_kit.tabular_config import parse_tabular_regressor
    from models.tabular import diabetes_split

    cpu = torch.device("cpu")
    config = parse_tabular_regressor({**handler_config, "model": {**handler_config["model"],
                                                                  "weights": "weights.pt"}})
    _, _, x_test, y_test, _ = diabetes_split()
    reference = tabular.load_regressor(weights_path, config.model, cpu, quantization="none")
    variant = tabular.load_regressor(weights_path, config.model, cpu,
                                     quantization=config.runtime.quantization)
    expected, predicted = reference.predict_rows(x_test), variant.predict_rows(x_test)
    target = torch.as_tensor(y_test, dtype=torch.float64)

    def r2(values):
        values = torch.as_tensor(values, dtype=torch.float64)
        return 1.0 - ((values - target) ** 2).sum().item() / ((target - target.mean()) ** 2).sum().item()

    difference = (torch.as_tensor(predicted) - torch.as_tensor(expected)).abs()
    return {"metric": "regression", "samples": int(len(y_test)), "r2": round(r2(predicted), 4),
            "fp32_r2": round(r2(expected), 4), "r2_drop": round(r2(expected) - r2(predicted), 4),
            "max_abs_difference": round(difference.max().item(), 4),
            "mean_abs_difference": round(difference.mean().item(), 4)}


# -- each metric's gate and how its figures read: one MetricRules per metric, named by the metric's
# declaration (models/families.py, Metric.rules); nothing else knows a metric by its name.
@dataclass(frozen=True)
class MetricRules:
    gate: Callable[[dict, dict, str], None]   # (fidelity settings, figures, archive) -> FidelityError
    gate_text: Callable[[dict], str]          # the gate in words (docs' fidelity table)
    figures_text: Callable[[dict], str]       # a build's figures in words (docs' fidelity table)
    cell: Callable[[dict], str]               # figures in a bench table cell ("-" when absent)
    header: str                               # the bench table's fidelity column


def rules_of(metric: str) -> MetricRules:
    from models.families import metric_named, resolve
    return resolve(metric_named(metric).rules)


def check(fidelity: dict, figures: dict, name: str) -> None:
    """Raise FidelityError with what failed and by how much: the gate of the fidelity metric."""
    rules_of(fidelity["metric"]).gate(fidelity, figures, name)


def _gate_embedding(fidelity: dict, figures: dict, name: str) -> None:
    problems = []
    if figures["min_cosine"] < float(fidelity.get("min_cosine", 0.95)):
        problems.append(f"min cosine to fp32 {figures['min_cosine']} < {fidelity.get('min_cosine', 0.95)}")
    if figures["pair_order"] < float(fidelity.get("min_pair_order", 1.0)):
        problems.append(f"paraphrase-over-unrelated order {figures['pair_order']} < "
                        f"{fidelity.get('min_pair_order', 1.0)} (fp32: {figures['fp32_pair_order']})")
    if problems:
        raise FidelityError(f"{name}: {'; '.join(problems)} on {figures['samples']} sentences; not packaged")


def _embedding_cell(figures: dict) -> str:
    if figures.get("reference"):
        return "reference"
    if "min_cosine" not in figures:
        return "-"
    lossy = " (lossy)" if figures.get("lossy") else ""
    return f"{figures['min_cosine']:.5f}, {figures['mean_cosine']:.5f}, {figures['pair_order']:.2f}{lossy}"


EMBEDDING = MetricRules(
    gate=_gate_embedding,
    gate_text=lambda gate: (f"min cosine >= {gate.get('min_cosine', 0.95)}, paraphrase order >= "
                            f"{gate.get('min_pair_order', 1.0)}"),
    figures_text=lambda f: (f"min cosine {f['min_cosine']:.5f}, mean {f['mean_cosine']:.5f}, "
                            f"paraphrase order {f['pair_order']:.2f}" + (", **lossy**" if f.get("lossy") else "")),
    cell=_embedding_cell,
    header="fidelity (min cosine, mean cosine to fp32, paraphrase order)")


def _gate_regression(fidelity: dict, figures: dict, name: str) -> None:
    limit = float(fidelity.get("max_r2_drop", 0.01))
    if figures["r2_drop"] > limit:
        raise FidelityError(f"{name}: held-out R^2 {figures['r2']} is {figures['r2_drop']} below "
                            f"fp32's {figures['fp32_r2']} (allowed: {limit}); not packaged")


def _regression_cell(figures: dict) -> str:
    if "r2" not in figures:
        return "-"
    drop = "reference" if figures.get("reference") else f"drop {figures['r2_drop']:.4f}"
    return f"{figures['r2']:.4f} ({drop})"


REGRESSION = MetricRules(
    gate=_gate_regression,
    gate_text=lambda gate: f"held-out R^2 drop <= {gate.get('max_r2_drop', 0.01)}",
    figures_text=lambda f: (f"R^2 {f['r2']:.4f} (fp32 {f['fp32_r2']:.4f}), max abs difference "
                            f"{f['max_abs_difference']:.2f}"),
    cell=_regression_cell,
    header="held-out R^2 (drop vs fp32)")


def _agreement_text(figures: dict) -> str:
    return f"top-1 agreement {figures['top1_agreement']:.4f}, mean cosine {figures['mean_cosine']:.5f}"


def _gate_accuracy(fidelity: dict, figures: dict, name: str) -> None:
    limit = float(fidelity.get("max_drop_points", 0.5))
    if figures["accuracy_drop_points"] > limit:
        raise FidelityError(
            f"{name}: held-out accuracy {figures['accuracy']:.2%} is {figures['accuracy_drop_points']} "
            f"points below fp32's {figures['fp32_accuracy']:.2%} (allowed: {limit}); not packaged")


def _accuracy_cell(figures: dict) -> str:
    if "accuracy" not in figures:
        return "-"
    drop = "reference" if figures.get("reference") else f"drop {figures['accuracy_drop_points']:.2f} points"
    return f"{100 * figures['accuracy']:.2f}% ({drop})"


ACCURACY = MetricRules(
    gate=_gate_accuracy,
    gate_text=lambda gate: f"held-out accuracy drop <= {gate.get('max_drop_points', 0.5)} points",
    figures_text=lambda f: (_agreement_text(f) + f"; accuracy {100 * f['accuracy']:.2f}% (fp32 "
                            f"{100 * f['fp32_accuracy']:.2f}%, drop {f['accuracy_drop_points']:.2f} points)"),
    cell=_accuracy_cell,
    header="held-out accuracy (drop vs fp32)")


def _gate_agreement(fidelity: dict, figures: dict, name: str) -> None:
    agreement_min = float(fidelity.get("min_top1_agreement", 0.98))
    cosine_min = float(fidelity.get("min_cosine", 0.99))
    problems = []
    if figures["top1_agreement"] < agreement_min:
        problems.append(f"top-1 agreement with fp32 {figures['top1_agreement']} < {agreement_min}")
    if figures["mean_cosine"] < cosine_min:
        problems.append(f"mean logit cosine {figures['mean_cosine']} < {cosine_min}")
    if problems:
        raise FidelityError(f"{name}: {'; '.join(problems)} on {figures['samples']} images; not packaged")


def _agreement_cell(figures: dict) -> str:
    if figures.get("reference"):
        return "reference"
    if "top1_agreement" not in figures:
        return "-"
    return f"{figures['top1_agreement']:.4f}, {figures['mean_cosine']:.5f}"


AGREEMENT = MetricRules(
    gate=_gate_agreement,
    gate_text=lambda gate: (f"top-1 agreement >= {gate.get('min_top1_agreement', 0.98)}, mean cosine >= "
                            f"{gate.get('min_cosine', 0.99)} on {gate.get('images', 64)} photo views"),
    figures_text=_agreement_text,
    cell=_agreement_cell,
    header="fidelity (top-1 agreement, mean cosine)")
