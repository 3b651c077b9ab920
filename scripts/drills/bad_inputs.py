"""Hostile and broken inputs for every served model, as data: each case is one request (body and
content type; multipart bodies are encoded here) with what the server must answer: a 4xx whose
message names the problem, or a 200 whose answer is checked (the same answer as an equivalent
upright/RGB/8-bit reference image, a known digit, a number of vectors...).

Everything is generated from the project's own sample data (nothing large is committed):

    python -m scripts.drills.bad_inputs --list              # the cases, one line each
    python -m scripts.drills.bad_inputs --write DIR         # DIR/<model>/<case>.<ext>, index.json, replay.sh (curl)
    python -m scripts.drills.bad_inputs --send [--models efficientnet_lite0,digits]
                                                     # replay against the running server (make serve)
Cases come from each model's family (models/families.py): its samples name the builders (RGB
photographs, grayscale digits, sentences, table rows: scripts/drills/bad_input_images.py and
scripts/drills/bad_input_cases.py) and the limits come from the model's handler config. Which models
are exercised comes from the catalog (its loaded_at_start names); CASE_BUILDERS holds one per
model of models/catalog.yaml, and cases for a model listed in PENDING_MODELS that the catalog
does not serve are reported as pending. The tests (tests/integration/test_bad_inputs.py) and the soak
(scripts/drills/soak.py) use the functions below.
"""
import argparse
import functools
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import requests

from models.families import family_of, resolve, samples_of
# The corpus's data and builders, re-exported: the tests and scripts/drills/soak.py use them from here.
from scripts.drills.bad_input_cases import (GIF, JPEG, JSON, OCTETS, PNG, TEXT, WEBP, AnswerCheck,  # noqa: F401
                                     Case, GoodRequest, _short, _topk_problem, encode_image)
from models.catalog import (CONFIG_PROPERTIES_PATH, ROOT, Catalog, ModelEntry, load_catalog,
                             parse_config_properties)
from scripts.serving.ts_client import TorchServeClient

# Models whose cases are written but which the catalog does not serve yet: their cases are
# reported as pending. Cases of any other model the catalog does not serve fail the tests (a
# model that was served must not silently stop being tested): add a model here only until its
# catalog entry lands.
PENDING_MODELS: Tuple[str, ...] = ()
TORCHSERVE_MAX_REQUEST_SIZE = 6553500  # TorchServe's default when the catalog sets none


# ---------------------------------------------------------------------------------------------
# judging an answer against a reference


def compare_answers(answer, reference, tolerance: float) -> Optional[str]:
    """Why ``answer`` is not the same answer as ``reference`` (None when it is), whatever the
    family: top-k classes (top-1 and probabilities), embeddings (cosine), predictions. Fields
    that name the model or version are not compared (a copy registered under another name
    answers with its own name)."""
    if isinstance(reference, list) and isinstance(answer, list):
        if _topk_problem(answer, None) or _topk_problem(reference, None):
            return f"not comparable top-k lists: {_short(answer)} vs {_short(reference)}"
        expected = {p["label"]: p["probability"] for p in reference}
        top, best = answer[0], reference[0]
        # Another top-1 is only acceptable where the reference itself has a tie within tolerance.
        if top["label"] != best["label"] and abs(expected.get(top["label"], -1.0) - best["probability"]) > tolerance:
            return f"top-1 is {top['label']!r} ({top['probability']:.4f}), expected {best['label']!r} " \
                   f"({best['probability']:.4f})"
        for p in answer:
            if p["label"] in expected and abs(p["probability"] - expected[p["label"]]) > tolerance:
                return f"probability of {p['label']!r} is {p['probability']:.6f}, expected " \
                       f"{expected[p['label']]:.6f} (tolerance {tolerance})"
        return None
    if isinstance(reference, dict) and "embeddings" in reference:
        if not isinstance(answer, dict) or "embeddings" not in answer:
            return f"expected embeddings, got {_short(answer)}"
        a, b = np.asarray(answer["embeddings"], np.float64), np.asarray(reference["embeddings"], np.float64)
        if a.shape != b.shape:
            return f"embeddings of shape {a.shape}, expected {b.shape}"
        cosine = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        return None if cosine.min() >= 1 - tolerance else f"embedding cosine {cosine.min():.6f} to the reference"
    if isinstance(reference, dict) and "predictions" in reference:
        if not isinstance(answer, dict) or "predictions" not in answer:
            return f"expected predictions, got {_short(answer)}"
        a, b = answer["predictions"], reference["predictions"]
        if len(a) != len(b) or any(abs(x - y) > tolerance * max(1.0, abs(y)) for x, y in zip(a, b)):
            return f"predictions {a}, expected {b}"
        return None
    return None if answer == reference else f"answer {_short(answer)}, expected {_short(reference)}"


# ---------------------------------------------------------------------------------------------
# the corpus: each model's family's cases, with the limits of its handler config


def _entry(catalog: Optional[Catalog], model: str) -> Optional[ModelEntry]:
    entries = [m for m in catalog.models if m.name == model] if catalog else []
    return entries[0] if entries else None


def _max_request_size(catalog: Optional[Catalog]) -> int:
    server = catalog.server if catalog else {}
    return int(server.get("max_request_size", TORCHSERVE_MAX_REQUEST_SIZE))


def family_cases(declared: ModelEntry, catalog: Optional[Catalog]) -> List[Case]:
    """The cases of a model (declared in models/catalog.yaml as ``declared``): its family's, with
    the limits of its handler config in ``catalog`` (the declared one where ``catalog`` lacks it)."""
    entry = _entry(catalog, declared.name) or declared
    limits = family_of(entry).handler_limits(entry.handler_config)
    return resolve(samples_of(entry).cases)(entry.name, limits, _max_request_size(catalog))


# One builder per model of models/catalog.yaml (default versions' names, in catalog order).
CASE_BUILDERS: Dict[str, Callable[[Optional[Catalog]], List[Case]]] = {
    m.name: functools.partial(family_cases, m) for m in load_catalog().models if m.is_default and m.variant == "fp32"}


def cases(models: Optional[Iterable[str]] = None, catalog: Optional[Catalog] = None) -> List[Case]:
    """The corpus (of ``models`` only, when given); limits such as max_chars or max_request_size
    come from the catalog where it declares the model."""
    catalog = catalog if catalog is not None else load_catalog()
    wanted = list(CASE_BUILDERS) if models is None else list(models)
    out: List[Case] = []
    for model in wanted:
        out += CASE_BUILDERS[model](catalog)
    names = [c.label for c in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"case names must be unique per model: {duplicates}")
    return out


def served_models(catalog: Catalog) -> List[str]:
    """Model names the catalog serves from the start (one per name, whatever its versions)."""
    return list(dict.fromkeys(m.name for m in catalog.loaded_at_start))


def coverage(catalog: Catalog) -> Dict[str, List[str]]:
    """{"run": models to exercise, "pending": models with cases that the catalog does not serve
    yet, "missing": problems that must fail a test (a served model without cases, or cases for a
    model neither served nor pending)}."""
    served = served_models(catalog)
    run = [m for m in served if m in CASE_BUILDERS]
    missing = [f"model {m!r} is served (catalog loaded_at_start) but scripts/drills/bad_inputs.py has no cases "
               f"for it: add a builder to CASE_BUILDERS" for m in served if m not in CASE_BUILDERS]
    pending = [m for m in CASE_BUILDERS if m not in served and m in PENDING_MODELS]
    missing += [f"cases for model {m!r} exist but the catalog does not serve it and it is not in "
                f"PENDING_MODELS: it would silently stop being tested" for m in CASE_BUILDERS
                if m not in served and m not in PENDING_MODELS]
    return {"run": run, "pending": pending, "missing": missing}


# ---------------------------------------------------------------------------------------------
# good requests: what the batches and the soak mix the cases with


def good_requests(model: str, catalog: Optional[Catalog] = None) -> List[GoodRequest]:
    """Valid requests of the model's ordinary kind (its family's samples); their correct answer
    is the one each gets alone (and, for digits, its true label)."""
    entry = _entry(catalog, model) or _entry(load_catalog(), model)
    if entry is None:
        raise KeyError(f"no good requests for model {model!r}")
    return resolve(samples_of(entry).good)(model)


# ---------------------------------------------------------------------------------------------
# sending and judging


@dataclass
class Outcome:
    status: Optional[int]           # None: no HTTP answer (connection reset, timeout)
    answer: object = None           # parsed JSON body (or text)
    message: str = ""               # the error message of a 4xx/5xx, or what went wrong
    seconds: float = 0.0


def send(client: TorchServeClient, model: str, body: bytes, content_type: str,
         timeout: float = 120.0) -> Outcome:
    started = time.perf_counter()
    try:
        response = client.predict_raw(model, body, content_type=content_type, timeout=timeout)
    except requests.RequestException as exc:
        return Outcome(None, None, f"{type(exc).__name__}: {exc}", time.perf_counter() - started)
    seconds = time.perf_counter() - started
    try:
        answer = response.json()
    except ValueError:
        answer = response.text
    message = ""
    if response.status_code >= 400:
        message = answer.get("message", json.dumps(answer)) if isinstance(answer, dict) else str(answer)
    return Outcome(response.status_code, answer, message, seconds)


def judge(case: Case, outcome: Outcome, reference_answer=None) -> Optional[str]:
    """Why the outcome is not what the case expects (None when it is)."""
    if outcome.status != case.status:
        got = "no HTTP answer" if outcome.status is None else f"HTTP {outcome.status}"
        return f"{got} ({_short(outcome.message or outcome.answer or '')}), expected {case.status}"
    if case.status >= 400:
        if case.message.lower() not in outcome.message.lower():
            return f"message {outcome.message!r} does not contain {case.message!r}"
        return None
    for check in case.checks:
        problem = check.problem(outcome.answer)
        if problem:
            return problem
    if case.reference is not None:
        return compare_answers(outcome.answer, reference_answer, case.tolerance)
    return None


def judge_good(request: GoodRequest, outcome: Outcome, alone_answer=None) -> Optional[str]:
    """Why a good request's outcome is not its correct answer (None when it is)."""
    if outcome.status != 200:
        got = "no HTTP answer" if outcome.status is None else f"HTTP {outcome.status}"
        return f"{got}: {_short(outcome.message or outcome.answer or '')}"
    for check in request.checks:
        problem = check.problem(outcome.answer)
        if problem:
            return problem
    if alone_answer is not None:
        return compare_answers(outcome.answer, alone_answer, request.tolerance)
    return None


def reference_answers(client: TorchServeClient, model: str, selected: Sequence[Case]) -> dict:
    """(reference body, content type) -> the answer the model gives it alone."""
    out = {}
    for case in selected:
        key = (case.reference, case.reference_content_type)
        if case.reference is not None and key not in out:
            outcome = send(client, model, case.reference, case.reference_content_type)
            if outcome.status != 200:
                raise RuntimeError(f"{case.label}: its reference input was answered {outcome.status}: "
                                   f"{outcome.message}")
            out[key] = outcome.answer
    return out


def worker_pids(client: TorchServeClient, models: Iterable[str]) -> Dict[str, List[int]]:
    """Model -> the pids of its workers, from the management API's describe (a restarted
    worker has a new pid)."""
    out = {}
    for model in models:
        workers = client.describe(model)[0].get("workers", [])
        out[model] = sorted(int(w["pid"]) for w in workers if w.get("pid") not in (None, "", -1))
    return out


@dataclass
class Result:
    case: Case
    outcome: Outcome
    problem: Optional[str]

    @property
    def ok(self) -> bool:
        return self.problem is None


def run_alone(client: TorchServeClient, selected: Sequence[Case], model_url: Optional[Callable[[str], str]] = None
              ) -> List[Result]:
    """Send each case on its own (one after the other) and judge it."""
    model_url = model_url or (lambda model: model)
    references: dict = {}
    results = []
    for case in selected:
        url = model_url(case.model)
        if case.reference is not None and (case.reference, case.reference_content_type) not in references:
            references.update(reference_answers(client, url, [case]))
        outcome = send(client, url, case.body, case.content_type)
        reference = references.get((case.reference, case.reference_content_type))
        results.append(Result(case, outcome, judge(case, outcome, reference)))
        if outcome.status is None or outcome.status >= 500:  # a dead worker: wait for its restart
            client.wait_ready([url], 300)
    return results


def results_table(results: Sequence[Result]) -> str:
    """Markdown table: case, status received, status expected, verdict, message or answer."""
    lines = ["| model | case | status | expected | verdict | message / answer |",
             "|---|---|---:|---:|---|---|"]
    for r in results:
        said = r.outcome.message if r.outcome.status != 200 else _short(r.outcome.answer, 70)
        verdict = "ok" if r.ok else f"WRONG: {r.problem}"
        status = "-" if r.outcome.status is None else r.outcome.status
        lines.append(f"| {r.case.model} | {r.case.name} | {status} | {r.case.status} | "
                     f"{_cell(verdict)} | {_cell(said)} |")
    return "\n".join(lines)


def _cell(text, limit: int = 140) -> str:
    text = _short(text, limit) if not isinstance(text, str) or len(text) > limit else text
    return text.replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------------------------------------
# writing the corpus for curl


EXTENSIONS = {JPEG: "jpg", PNG: "png", GIF: "gif", WEBP: "webp", JSON: "json", "image/bmp": "bmp",
              "image/tiff": "tif", "text/plain": "txt", TEXT: "txt"}


def _extension(content_type: str) -> str:
    if content_type.startswith("multipart/"):
        return "multipart"
    return EXTENSIONS.get(content_type, "bin")


def write_corpus(folder: str, selected: Sequence[Case], inference_url: str = "http://127.0.0.1:8080") -> str:
    """DIR/<model>/<case>.<ext> (+ .reference.<ext>), DIR/index.json and DIR/replay.sh; returns
    the index path."""
    index = []
    script = ["#!/bin/sh",
              "# Replays every case with curl; prints model/case, the status received and the one expected.",
              "# KEY: an inference key (.venv/bin/python -m scripts.serving.serve key inference); URL: the inference API.",
              f'URL="${{URL:-{inference_url}}}"', 'cd "$(dirname "$0")"']
    for case in selected:
        os.makedirs(os.path.join(folder, case.model), exist_ok=True)
        path = f"{case.model}/{case.name}.{_extension(case.content_type)}"
        with open(os.path.join(folder, path), "wb") as f:
            f.write(case.body)
        entry = {"model": case.model, "name": case.name, "file": path, "content_type": case.content_type,
                 "bytes": len(case.body), "status": case.status, "message": case.message,
                 "checks": [str(c) for c in case.checks], "what": case.what}
        if case.reference is not None:
            reference = f"{case.model}/{case.name}.reference.{_extension(case.reference_content_type)}"
            with open(os.path.join(folder, reference), "wb") as f:
                f.write(case.reference)
            entry.update(reference=reference, reference_content_type=case.reference_content_type,
                         tolerance=case.tolerance)
        index.append(entry)
        curl = (f'curl -s -o /dev/null -w "{case.model}/{case.name} %{{http_code}} (expected {case.status})\\n" '
                f'-H "Authorization: Bearer $KEY" -H {shlex.quote("Content-Type: " + case.content_type)} '
                f'--data-binary @{shlex.quote(path)} "$URL/predictions/{case.model}"')
        script.append(curl)
    index_path = os.path.join(folder, "index.json")
    with open(index_path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)
    with open(os.path.join(folder, "replay.sh"), "w", encoding="utf-8") as f:
        f.write("\n".join(script) + "\n")
    os.chmod(os.path.join(folder, "replay.sh"), 0o755)
    return index_path


# ---------------------------------------------------------------------------------------------
# command line


def running_client(config_path: str = CONFIG_PROPERTIES_PATH, home: str = ROOT) -> TorchServeClient:
    """A client for the server `make serve` started (addresses from config.properties, keys from
    its key_file.json)."""
    with open(config_path, encoding="utf-8") as f:
        props = parse_config_properties(f.read())
    return TorchServeClient(props["inference_address"], props["management_address"], home)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--list", action="store_true", help="print the cases")
    action.add_argument("--write", metavar="DIR", help="write the corpus files, index.json and replay.sh")
    action.add_argument("--send", action="store_true", help="replay against the running server")
    parser.add_argument("--models", help="comma-separated model names (default: every model with cases)")
    parser.add_argument("--config", default=CONFIG_PROPERTIES_PATH, help="config.properties of the server")
    parser.add_argument("--home", default=ROOT, help="folder holding the server's key_file.json")
    args = parser.parse_args(argv)
    catalog = load_catalog()
    wanted = args.models.split(",") if args.models else list(CASE_BUILDERS)
    unknown = [m for m in wanted if m not in CASE_BUILDERS]
    if unknown:
        parser.error(f"no cases for {', '.join(unknown)}; models with cases: {', '.join(CASE_BUILDERS)}")
    selected = cases(wanted, catalog)
    if args.list:
        for case in selected:
            print(f"{case.label:48s} {case.status}  {case.message or ', '.join(map(str, case.checks)):32s} {case.what}")
        print(f"{len(selected)} cases")
        return 0
    if args.write:
        print(f"{len(selected)} cases written; index: {write_corpus(args.write, selected)}")
        return 0
    client = running_client(args.config, args.home)
    served = {m["modelName"] for m in client.list_models()}
    pending = [c for c in selected if c.model not in served]
    results = run_alone(client, [c for c in selected if c.model in served])
    print(results_table(results))
    wrong = [r for r in results if not r.ok]
    for model in sorted({c.model for c in pending}):
        print(f"pending: {model} is not served by {client.inference_url} "
              f"({sum(c.model == model for c in pending)} cases not sent)")
    print(f"{len(results) - len(wrong)} of {len(results)} cases answered as expected"
          + (f"; WRONG: {', '.join(r.case.label for r in wrong)}" if wrong else ""))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
