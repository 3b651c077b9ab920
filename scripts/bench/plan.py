"""Which rows a `make bench` run measures: the foundation (a)-(d) and one variants table per model."""
from dataclasses import dataclass
from typing import Dict, List, Sequence

from models.catalog import Catalog, ModelEntry
from scripts.bench.measure import CONTENT_TYPES, IN_PROCESS, INPUTS, ITEM_UNITS, MODEL, SERVED, archive_stem, log
from scripts.bench.served import ServedVariant, catalog_registration, foundation_served

ALL_VARIANTS = ("a", "b", "c", "d")

# The fp32 EfficientNet-Lite0 row of the variants table is the foundation's (a) and (b): same archive,
# same pipeline, same serving settings. It is measured once and shown in both tables.
FOUNDATION_ALIAS = {IN_PROCESS: "a", SERVED: "b"}


# -- what to measure -----------------------------------------------------------------------------
@dataclass(frozen=True)
class VariantRow:
    entry: ModelEntry
    in_process_key: str
    served_key: str


@dataclass(frozen=True)
class VariantTable:
    base: ModelEntry             # the archive the variants are built from: speeds compare with it
    rows: tuple

    @property
    def metric(self) -> str:     # what the build's fidelity gate measured: agreement | accuracy | ...
        return self.base.fidelity["metric"]

    @property
    def unit(self) -> str:
        return ITEM_UNITS[self.base.family]


def row_key(entry: ModelEntry, mode: str, foundation: Sequence[str]) -> str:
    alias = FOUNDATION_ALIAS[mode]
    if entry.name == MODEL and alias in foundation:
        return alias
    return f"{archive_stem(entry)} {mode}"


def tabled_models(catalog: Catalog, families: Sequence[str]) -> List[ModelEntry]:
    """The archive each variants table compares with (model_store/<name>.mar, which the variants
    are built from), for the catalog models of ``families`` that the benchmark has inputs for."""
    bases = []
    for name in dict.fromkeys(e.base for e in catalog.models):
        base = catalog.archive(name)
        if base.family not in families:
            continue
        if name not in INPUTS:
            log(f"no benchmark inputs for {name} (INPUTS in scripts/bench/measure.py): no table for it")
            continue
        bases.append(base)
    return bases


def plan_variant_tables(catalog: Catalog, variants: Sequence[str], foundation: Sequence[str],
                        families: Sequence[str]) -> List[VariantTable]:
    """One table per catalog model of ``families``, rows in catalog order (fp32 first). A model's
    other versions (digits 2.0) are not variants of it and get no row."""
    tables = []
    for base in tabled_models(catalog, families):
        rows = tuple(VariantRow(e, row_key(e, IN_PROCESS, foundation), row_key(e, SERVED, foundation))
                     for e in catalog.models
                     if e.base == base.name and e.version == base.version and e.variant in variants)
        if rows:
            tables.append(VariantTable(base, rows))
    return tables


def in_process_plan(entry: ModelEntry, foundation: Sequence[str],
                    tables: Sequence[VariantTable]) -> List[tuple]:
    """(key, entry) of each in-process row to measure; the foundation's (a) first."""
    plan = [("a", entry)] if "a" in foundation else []
    plan += [(row.in_process_key, row.entry) for table in tables for row in table.rows
             if row.in_process_key not in ALL_VARIANTS]
    return plan


def served_plan(entry: ModelEntry, foundation: Sequence[str], tables: Sequence[VariantTable],
                inputs: Dict[str, Dict[str, bytes]]) -> List[ServedVariant]:
    """Each served row to measure, the foundation's (b), (c), (d) first."""
    plan = foundation_served(entry, foundation, inputs[entry.name]) if foundation else []
    plan += [ServedVariant(row.served_key, row.entry.name, row.entry.mar_name,
                           catalog_registration(row.entry), inputs[table.base.name],
                           CONTENT_TYPES[table.base.family], table.unit)
             for table in tables for row in table.rows if row.served_key not in ALL_VARIANTS]
    return plan
