"""Writes config.properties from models/catalog.yaml (``make config``); ``--check`` only compares."""
import argparse
import sys

from scripts.catalog import CONFIG_PROPERTIES_PATH, load_catalog, render_config_properties


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if config.properties is stale")
    args = parser.parse_args(argv)
    text = render_config_properties(load_catalog())
    if args.check:
        with open(CONFIG_PROPERTIES_PATH, encoding="utf-8") as f:
            if f.read() != text:
                print("config.properties is out of date: run `make config`", file=sys.stderr)
                return 1
        return 0
    with open(CONFIG_PROPERTIES_PATH, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {CONFIG_PROPERTIES_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
