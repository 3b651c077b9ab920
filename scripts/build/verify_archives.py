"""Checks the model store against the sums recorded when its archives were built.

scripts/build/build_archives.py writes model_store/SHA256SUMS (``<sha256>  <name>.mar`` per line). Before
a server is started from the store, every archive must be exactly what the build produced: an
archive whose sha256 differs, one listed but missing, or one present but not listed is refused.

    python -m scripts.build.verify_archives [--store model_store]

Exit status 0 when the store matches, 1 (naming each archive) when it does not.
"""
import argparse
import hashlib
import os
import sys
from typing import Dict, List

from models.catalog import MODEL_STORE, ROOT

SUMS_FILE = "SHA256SUMS"
ARCHIVE_SUFFIX = ".mar"


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_sums(path: str) -> Dict[str, str]:
    """archive name -> sha256, from a sha256sum-style file."""
    sums = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            digest, _, name = line.rstrip("\n").partition("  ")
            if len(digest) != 64 or not name:
                raise ValueError(f"{path}:{number}: not '<sha256>  <name>': {line.strip()!r}")
            sums[name.lstrip("*")] = digest.lower()
    return sums


def check_store(store: str) -> List[str]:
    """One line per problem (empty when every archive matches its recorded sum)."""
    sums_path = os.path.join(store, SUMS_FILE)
    if not os.path.isfile(sums_path):
        return [f"{SUMS_FILE} is missing from {store}: rebuild the archives (make build)"]
    try:
        sums = read_sums(sums_path)
    except ValueError as exc:
        return [str(exc)]
    problems = []
    for name in sorted(sums):
        path = os.path.join(store, name)
        if not os.path.isfile(path):
            problems.append(f"{name}: listed in {SUMS_FILE} but missing from the store")
            continue
        found = sha256_file(path)
        if found != sums[name]:
            problems.append(f"{name}: sha256 {found} differs from the {sums[name]} recorded "
                            f"in {SUMS_FILE}")
    for name in sorted(os.listdir(store)):
        if name.endswith(ARCHIVE_SUFFIX) and name not in sums:
            problems.append(f"{name}: in the store but not listed in {SUMS_FILE}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default=MODEL_STORE, help="default: model_store")
    args = parser.parse_args(argv)
    problems = check_store(args.store)
    shown = os.path.relpath(args.store, ROOT) if args.store.startswith(ROOT) else args.store
    if problems:
        print(f"{shown}: {len(problems)} archive(s) do not match {SUMS_FILE}; refusing to serve:",
              file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    count = len(read_sums(os.path.join(args.store, SUMS_FILE)))
    print(f"{shown}: {count} archives match {SUMS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
