"""README's measured tables are the ones the tools wrote from the recorded results, and the
recorded fidelity figures cover exactly the gated archives of the catalog, each at full strength."""
from scripts import readme_tables
from scripts.catalog import load_catalog

DEFAULT_AGREEMENT, DEFAULT_COSINE, LEAST_IMAGES = 0.98, 0.99, 64


def test_readme_fidelity_table_is_the_recorded_one():
    with open(readme_tables.README_PATH, encoding="utf-8") as f:
        readme = f.read()
    assert readme == readme_tables.rendered_readme(readme, readme_tables.load_results()), \
        "README.md's generated table is stale: run `python -m scripts.readme_tables write`"


def test_recorded_fidelity_covers_every_gated_archive_of_the_catalog():
    recorded = {row["archive"]: row for row in readme_tables.load_results()["archives"]}
    gated = readme_tables.gated_entries(load_catalog())
    assert sorted(recorded) == sorted(m.mar_name for m in gated), \
        "the catalog's variants changed: `make build`, then `python -m scripts.readme_tables record`"
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
    from scripts import fidelity
    for row in readme_tables.load_results()["archives"]:
        fidelity.check(row["gate"], row["figures"], row["archive"])  # raises FidelityError


def test_a_table_row_per_recorded_archive():
    results = readme_tables.load_results()
    lines = readme_tables.fidelity_table(results)
    rows = [line for line in lines if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == [row["archive"] for row in results["archives"]]
    assert all(r.count("|") == 5 for r in rows)  # no stray pipe splits a cell
