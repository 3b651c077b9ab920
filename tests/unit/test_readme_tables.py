"""The documentation's measured and case tables are the ones the tools wrote (from the recorded
results, and from the bad-input corpus), the recorded fidelity figures cover exactly the gated
archives of the catalog, each at full strength, README stays a newcomer's page, and every relative
link of README.md and docs/*.md resolves, anchors included."""
import glob
import os
import re

import pytest

from scripts.docs import readme_tables
from models.catalog import ROOT, load_catalog

DEFAULT_AGREEMENT, DEFAULT_COSINE, LEAST_IMAGES = 0.98, 0.99, 64
README_MAX_LINES = 300


@pytest.fixture(scope="module")
def corpus():
    return readme_tables.corpus_cases()


def test_generated_tables_are_the_recorded_ones(corpus):
    pages = readme_tables.rendered_pages(selected=corpus)
    assert set(pages) == set(readme_tables.GENERATED_PAGES)
    for page, (now, expected) in pages.items():
        assert now == expected, \
            f"{os.path.relpath(page, ROOT)}'s generated table is stale: run `python -m scripts.docs.readme_tables write`"


def test_each_generated_block_is_on_its_page_once():
    for page, blocks in readme_tables.generated_blocks(selected=[]).items():
        with open(page, encoding="utf-8") as f:
            text = f.read()
        for start, end, _ in blocks:
            assert text.count(start) == 1 and text.count(end) == 1, (page, start)
    with open(readme_tables.README_PATH, encoding="utf-8") as f:
        readme = f.read()
    # README's one measured table is the targets' (written from the recorded run); the rest live in docs/
    assert re.findall(r"<!-- generated:([a-z-]+) start -->", readme) == ["targets"]


def test_a_case_table_row_per_corpus_case(corpus):
    lines = readme_tables.case_tables(corpus)
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| case ")]
    assert [row.split(" | ")[0][2:] for row in rows] == [case.name for case in corpus]
    assert [int(row.split(" | ")[2]) for row in rows] == [case.status for case in corpus]
    for row, case in zip(rows, corpus):
        assert len(re.findall(r"(?<!\\)\|", row)) == 5, row  # no stray pipe splits a cell
        if case.status != 200 and case.message:
            assert f"`{case.message}`" in row.replace("\\|", "|"), row  # the fragment the test demands
    models = list(dict.fromkeys(case.model for case in corpus))
    assert [line for line in lines if line.startswith("**")] == \
        [f"**{m}** ({sum(c.model == m for c in corpus)} cases)" for m in models]


def test_readme_is_a_newcomers_page():
    with open(readme_tables.README_PATH, encoding="utf-8") as f:
        text = f.read()
    assert len(text.splitlines()) <= README_MAX_LINES
    for section in ("## Quick start", "## Where to change what", "## Topic pages"):
        assert section in text, section
    where = text.split("## Where to change what", 1)[1].split("\n## ", 1)[0]
    for fact in ("models/catalog.yaml", "models/weights.py", "docs/own-model.md", "`serving:`",
                 "`versions:`", "`variants:`", "make config", "make tune", "docs/tuning.md",
                 "docs/deployment-k8s.md", "docs/gateway-and-rehearsal.md"):
        assert fact in where, fact
    assert "docs/torchserve-workarounds.md" in text


def github_anchor(heading: str, seen: dict) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens,
    repeats numbered -1, -2..."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip()).lower()
    slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    return slug if count == 0 else f"{slug}-{count}"


def markdown_outside_code(text: str) -> list:
    lines, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if not fence:
            lines.append(line)
    return lines


def anchors(path: str) -> set:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    seen: dict = {}
    return {github_anchor(line.lstrip("#"), seen) for line in markdown_outside_code(text)
            if re.match(r"#{1,6} ", line)}


def test_github_anchor_rules():
    seen: dict = {}
    assert github_anchor("TorchServe 0.12 on torch 2.14", seen) == "torchserve-012-on-torch-214"
    assert github_anchor("Images (`efficientnet_lite0`, `digits`)", seen) == "images-efficientnet_lite0-digits"
    assert github_anchor("Beyond one machine: image, Kubernetes, gateway", seen) == \
        "beyond-one-machine-image-kubernetes-gateway"
    assert github_anchor("TorchServe 0.12 on torch 2.14", seen) == "torchserve-012-on-torch-214-1"


def test_every_relative_link_resolves():
    pages = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    broken, checked = [], 0
    for page in pages:
        with open(page, encoding="utf-8") as f:
            text = f.read()
        for line in markdown_outside_code(text):
            line = re.sub(r"`[^`]*`", "", line)  # code spans are not links
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"[a-z]+:", target):  # https:, mailto:
                    continue
                checked += 1
                path, _, anchor = target.partition("#")
                resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
                where = f"{os.path.relpath(page, ROOT)}: ({target})"
                if not os.path.exists(resolved):
                    broken.append(f"{where}: {os.path.relpath(resolved, ROOT)} does not exist")
                elif anchor and (not resolved.endswith(".md") or anchor not in anchors(resolved)):
                    broken.append(f"{where}: no heading with anchor #{anchor}")
    assert checked > 50
    assert not broken, "\n".join(broken)


def test_recorded_fidelity_covers_every_gated_archive_of_the_catalog():
    recorded = {row["archive"]: row for row in readme_tables.load_results()["archives"]}
    gated = readme_tables.gated_entries(load_catalog())
    assert sorted(recorded) == sorted(m.mar_name for m in gated), \
        "the catalog's variants changed: `make build`, then `python -m scripts.docs.readme_tables record`"
    for entry in gated:
        assert recorded[entry.mar_name]["gate"] == entry.fidelity  # recorded under today's gate


def test_no_gate_below_the_defaults_anywhere_in_the_catalog():
    for entry in load_catalog().models:
        gate = entry.fidelity
        if gate["metric"] == "agreement":
            assert float(gate.get("min_top1_agreement", DEFAULT_AGREEMENT)) >= DEFAULT_AGREEMENT, entry.name
            assert float(gate.get("min_cosine", DEFAULT_COSINE)) >= DEFAULT_COSINE, entry.name
            assert int(gate.get("images", LEAST_IMAGES)) >= LEAST_IMAGES, entry.name


def test_recorded_figures_pass_their_gates():
    from scripts.build import fidelity
    for row in readme_tables.load_results()["archives"]:
        fidelity.check(row["gate"], row["figures"], row["archive"])  # raises FidelityError


def test_a_table_row_per_recorded_archive():
    results = readme_tables.load_results()
    lines = readme_tables.fidelity_table(results)
    rows = [line for line in lines if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == [row["archive"] for row in results["archives"]]
    assert all(r.count("|") == 5 for r in rows)  # no stray pipe splits a cell


def test_readme_shows_one_example_per_family_with_its_answer():
    """README's quick start: a curl per family, each followed by an answer of the shape that
    tests/integration/test_readme.py checks when it runs that curl against a real TorchServe."""
    from models.sample_data import PHOTO_CLASSES
    with open(readme_tables.README_PATH, encoding="utf-8") as f:
        quick_start = f.read().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(bash|json)\n(.*?)```", quick_start, re.S)
    answers = {}
    for (kind, body), (next_kind, answer) in zip(blocks, blocks[1:]):
        if kind == "bash" and next_kind == "json" and body.startswith("curl "):
            answers[re.search(r"/predictions/(\w+)", body).group(1)] = answer
    assert set(answers) == {"efficientnet_lite0", "minilm", "diabetes"}
    assert "build/samples/china.jpg" in quick_start
    top1 = re.search(r'"label": "([^"]+)"', answers["efficientnet_lite0"]).group(1)
    assert top1 in PHOTO_CLASSES["china.jpg"]
    assert '"dimension": 384' in answers["minilm"] and '"embeddings"' in answers["minilm"]
    prediction = float(re.search(r'"predictions": \[([0-9.]+)\]', answers["diabetes"]).group(1))
    assert 25 <= prediction <= 346  # the target's range, as tests/integration/test_readme.py checks
