"""Writes config.properties from models/catalog.yaml and metrics.yaml from the handlers' metric
declarations (``make config``); ``--check`` only compares."""
import argparse
import sys

from models.catalog import (CONFIG_PROPERTIES_PATH, METRICS_CONFIG_PATH, load_catalog,
                            render_config_properties, render_metrics_config)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if config.properties is stale")
    args = parser.parse_args(argv)
    outputs = {CONFIG_PROPERTIES_PATH: render_config_properties(load_catalog()),
               METRICS_CONFIG_PATH: render_metrics_config()}
    for path, text in outputs.items():
        if args.check:
            with open(path, encoding="utf-8") as f:
                if f.read() != text:
                    print(f"{path} is out of date: run `make config`", file=sys.stderr)
                    return 1
            continue
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
