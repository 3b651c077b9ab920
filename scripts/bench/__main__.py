"""python -m scripts.bench: `make bench` (scripts/bench/cli.py)."""
import sys

from scripts.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
