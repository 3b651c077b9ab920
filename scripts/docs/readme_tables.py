"""The documentation's generated tables, written by tools from recorded results and never by hand.

    python -m scripts.docs.readme_tables record        # the built archives' fidelity figures -> docs/results/fidelity.json
    python -m scripts.docs.readme_tables record-bench  # make bench's build/bench/latest.md, single_request.md and
                                                       # targets.md -> docs/results/ (one run)
    python -m scripts.docs.readme_tables record-tune   # make tune's build/tuned/<this machine>.md -> docs/results/tuned.md
    python -m scripts.docs.readme_tables write         # every page's generated blocks (GENERATED_PAGES)
    python -m scripts.docs.readme_tables check         # exit 1 if a page differs from what `write` gives

The fidelity gate measures every variant when `make build` packages it (scripts/build/fidelity.py) and
the figures travel in the archive (`handler.meta.fidelity`). `record` copies them, with the CPU
that measured them, into docs/results/fidelity.json (committed); `write` renders the block of
docs/variants-and-fidelity.md between the markers below from that file, and a test checks the
page against it, so the table is always the one the tool wrote from the recorded figures.
`record-bench` does the same for the tables `make bench` printed (its latest.md, the single-request
rows and the targets of the same run, as the bench wrote them), rendered into docs/benchmarks.md and,
the targets, into README.md; `record-tune` for the table `make tune` chose from (docs/tuning.md). The bad-input case tables of
docs/formats-and-errors.md are written from the corpus itself (scripts/drills/bad_inputs.py `cases()`,
with the catalog's limits), so they change when the corpus or the limits do.
"""
import argparse
import json
import os
import platform
import sys
import zipfile
from typing import Dict, List

import yaml

from models.catalog import MODEL_STORE, ROOT, Catalog, load_catalog
from scripts.build.fidelity import rules_of

README_PATH = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
FIDELITY_PAGE = os.path.join(DOCS, "variants-and-fidelity.md")
BENCH_PAGE = os.path.join(DOCS, "benchmarks.md")
CASES_PAGE = os.path.join(DOCS, "formats-and-errors.md")
FIDELITY_RESULTS = os.path.join(ROOT, "docs", "results", "fidelity.json")
BENCH_RESULTS = os.path.join(ROOT, "docs", "results", "bench.md")
BENCH_LATEST = os.path.join(ROOT, "build", "bench", "latest.md")
TUNING_PAGE = os.path.join(DOCS, "tuning.md")
# make bench's other outputs of the same run, and make tune's table: (written by, recorded as)
SINGLE_LATEST = os.path.join(ROOT, "build", "bench", "single_request.md")
SINGLE_RESULTS = os.path.join(ROOT, "docs", "results", "single_request.md")
TARGETS_LATEST = os.path.join(ROOT, "build", "bench", "targets.md")
TARGETS_RESULTS = os.path.join(ROOT, "docs", "results", "targets.md")
TUNED_RESULTS = os.path.join(ROOT, "docs", "results", "tuned.md")
SINGLE_START, SINGLE_END = "<!-- generated:single-request start -->", "<!-- generated:single-request end -->"
TARGETS_START, TARGETS_END = "<!-- generated:targets start -->", "<!-- generated:targets end -->"
TUNED_START, TUNED_END = "<!-- generated:tuned start -->", "<!-- generated:tuned end -->"
START, END = "<!-- generated:fidelity-table start -->", "<!-- generated:fidelity-table end -->"
BENCH_START, BENCH_END = "<!-- generated:bench start -->", "<!-- generated:bench end -->"
CASES_START, CASES_END = "<!-- generated:bad-input-cases start -->", "<!-- generated:bad-input-cases end -->"


def archive_meta(mar_path: str) -> dict:
    with zipfile.ZipFile(mar_path) as archive:
        return yaml.safe_load(archive.read("model-config.yaml"))["handler"].get("meta", {})


def gated_entries(catalog: Catalog) -> list:
    """The archives the fidelity gate measured: every variant, and a base served transformed."""
    return [m for m in catalog.models if m.variant != "fp32" or m.transform]


def machine() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} CPU capability " \
           f"{torch.backends.cpu.get_cpu_capability()}"


def record(catalog: Catalog, store: str = MODEL_STORE, path: str = FIDELITY_RESULTS) -> dict:
    rows = []
    for entry in gated_entries(catalog):
        mar = os.path.join(store, entry.mar_name)
        if not os.path.isfile(mar):
            raise SystemExit(f"{entry.mar_name} is not in {store}: run `make build` first")
        rows.append({"archive": entry.mar_name, "model": entry.base, "variant": entry.variant,
                     "gate": dict(entry.fidelity), "figures": archive_meta(mar).get("fidelity", {})})
    results = {"machine": machine(), "archives": rows}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    return results


def _gate_text(gate: dict) -> str:
    return rules_of(gate["metric"]).gate_text(gate) if "metric" in gate else str(gate)


def _figures_text(figures: dict) -> str:
    return rules_of(figures["metric"]).figures_text(figures) if "metric" in figures else json.dumps(figures)


def fidelity_table(results: dict) -> List[str]:
    lines = [f"Recorded by `python -m scripts.docs.readme_tables record` from the archives' "
             f"`meta.fidelity` ({results['machine']}):", "",
             "| archive | gate | samples | measured against fp32 |", "| --- | --- | ---: | --- |"]
    for row in results["archives"]:
        figures = row["figures"]
        lines.append(f"| `{row['archive']}` | {_gate_text(row['gate'])} | {figures.get('samples', '-')} | "
                     f"{_figures_text(figures)} |")
    return lines


def render_block(text: str, start: str, end: str, lines: List[str], page: str = "README.md") -> str:
    if start not in text or end not in text:
        raise SystemExit(f"{page} lacks the markers {start} ... {end}")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return head + start + "\n" + "\n".join(lines) + "\n" + end + tail


def load_results(path: str = FIDELITY_RESULTS) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def copy_result(latest: str, path: str, hint: str) -> None:
    if not os.path.isfile(latest):
        raise SystemExit(f"{os.path.relpath(latest, ROOT)} is missing: run `{hint}` first")
    with open(latest, encoding="utf-8") as f:
        text = f.read()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.rstrip("\n") + "\n")


def tuned_latest() -> str:
    """This machine's tuned table (build/tuned/<key>.md, written beside its profile)."""
    from scripts.serving import tuned_profile as tp
    return tp.profile_path(tp.profile_key(tp.machine_facts()))[:-len(".json")] + ".md"


def recorded_lines(path: str, command: str, origin: str) -> List[str]:
    if not os.path.isfile(path):
        return [f"Not recorded yet: `python -m scripts.docs.readme_tables {command}` writes it."]
    with open(path, encoding="utf-8") as f:
        return [f"Recorded by `python -m scripts.docs.readme_tables {command}` from {origin}:", ""] \
            + f.read().rstrip("\n").splitlines()


def bench_lines(path: str = BENCH_RESULTS) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return ["Recorded by `python -m scripts.docs.readme_tables record-bench` from `make bench`'s latest.md:",
                ""] + f.read().rstrip("\n").splitlines()


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _expectation(case) -> str:
    """What a case must get, as the corpus says it: the fragment a 4xx message must contain, or
    (a 200) what the answer must equal and the checks it must pass."""
    if case.status != 200:
        return f"`{_cell(case.message)}`" if case.message else "any message"
    answer = case.what.rpartition(": ")[2] if ": " in case.what else ""
    checks = [str(c) for c in case.checks]
    if case.reference is not None:
        checks.append(f"within {case.tolerance:g} of the reference's answer")
    parts = [answer] if answer else []
    if checks:
        parts.append("checked: " + ", ".join(checks))
    return _cell("; ".join(parts))


def case_tables(selected) -> List[str]:
    """One table per model of the bad-input corpus: case, input, status, expectation."""
    models = list(dict.fromkeys(case.model for case in selected))
    lines = [f"Written by `python -m scripts.docs.readme_tables write` from the corpus (`scripts.drills.bad_inputs.cases()`, "
             f"limits from the catalog): {len(selected)} cases, {len(models)} models.", ""]
    for model in models:
        mine = [case for case in selected if case.model == model]
        lines += [f"**{model}** ({len(mine)} cases)", "",
                  "| case | input | status | message contains, or what the answer equals |", "|---|---|---:|---|"]
        for case in mine:
            what = case.what.rpartition(": ")[0] if case.status == 200 and ": " in case.what else case.what
            lines.append(f"| {case.name} | {_cell(what)} | {case.status} | {_expectation(case)} |")
        lines.append("")
    return lines[:-1]


def corpus_cases():
    from scripts.drills import bad_inputs
    return bad_inputs.cases()


def generated_blocks(results: Dict = None, bench_path: str = BENCH_RESULTS, selected=None) -> Dict[str, list]:
    """{page: [(start marker, end marker, lines)]}: every generated block of the documentation."""
    results = load_results() if results is None else results
    selected = corpus_cases() if selected is None else selected
    return {FIDELITY_PAGE: [(START, END, fidelity_table(results))],
            BENCH_PAGE: [(BENCH_START, BENCH_END, bench_lines(bench_path)),
                         (SINGLE_START, SINGLE_END,
                          recorded_lines(SINGLE_RESULTS, "record-bench", "the same run's single_request.md"))],
            CASES_PAGE: [(CASES_START, CASES_END, case_tables(selected))],
            TUNING_PAGE: [(TUNED_START, TUNED_END, recorded_lines(TUNED_RESULTS, "record-tune", "`make tune`'s table"))],
            README_PATH: [(TARGETS_START, TARGETS_END,
                           recorded_lines(TARGETS_RESULTS, "record-bench", "`make bench`'s targets.md"))]}


GENERATED_PAGES = (FIDELITY_PAGE, BENCH_PAGE, CASES_PAGE, TUNING_PAGE, README_PATH)


def rendered_page(text: str, blocks: list, page: str) -> str:
    for start, end, lines in blocks:
        text = render_block(text, start, end, lines, os.path.relpath(page, ROOT))
    return text


def rendered_pages(**kwargs) -> Dict[str, tuple]:
    """{page: (its text now, its text as `write` gives it)}."""
    out = {}
    for page, blocks in generated_blocks(**kwargs).items():
        with open(page, encoding="utf-8") as f:
            text = f.read()
        out[page] = (text, rendered_page(text, blocks, page))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("record", "record-bench", "record-tune", "write", "check"))
    args = parser.parse_args(argv)
    if args.command == "record":
        results = record(load_catalog())
        print(f"recorded {len(results['archives'])} archives in {os.path.relpath(FIDELITY_RESULTS, ROOT)}")
        args.command = "write"
    if args.command == "record-bench":
        for latest, path in ((BENCH_LATEST, BENCH_RESULTS), (SINGLE_LATEST, SINGLE_RESULTS),
                             (TARGETS_LATEST, TARGETS_RESULTS)):
            copy_result(latest, path, "make bench")
            print(f"recorded {os.path.relpath(latest, ROOT)} in {os.path.relpath(path, ROOT)}")
        args.command = "write"
    if args.command == "record-tune":
        latest = tuned_latest()
        copy_result(latest, TUNED_RESULTS, "make tune")
        print(f"recorded {os.path.relpath(latest, ROOT)} in {os.path.relpath(TUNED_RESULTS, ROOT)}")
        args.command = "write"
    pages = rendered_pages()
    if args.command == "check":
        stale = [os.path.relpath(page, ROOT) for page, (now, expected) in pages.items() if now != expected]
        if stale:
            print(f"generated tables are stale in {', '.join(stale)}: run `python -m scripts.docs.readme_tables write`",
                  file=sys.stderr)
            return 1
        return 0
    for page, (now, expected) in pages.items():
        if now != expected:
            with open(page, "w", encoding="utf-8") as f:
                f.write(expected)
            print(f"{os.path.relpath(page, ROOT)}: generated tables written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
