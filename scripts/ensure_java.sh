#!/usr/bin/env bash
# TorchServe's frontend needs Java 17+. Use the one on PATH; where there is none and we may,
# install Debian's openjdk-17-jre-headless; otherwise say exactly what to do.
set -euo pipefail
version() { java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1; }
if command -v java >/dev/null 2>&1 && [ "$(version)" -ge 17 ] 2>/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Java 17 not found: installing openjdk-17-jre-headless with apt-get"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless
  exit 0
fi
echo "TorchServe needs Java 17 or newer and none was found on PATH." >&2
echo "Install it (Debian/Ubuntu: sudo apt-get install openjdk-17-jre-headless) or put one on PATH." >&2
exit 1
