#!/usr/bin/env bash
# Here, before a session's GPU calls: packs what the lent GPU machine lacks (it has PyTorch,
# torchvision and pytest, but no Java, no TorchServe, no timm and no archives). Each bundle
# travels with one device call (64 MiB per call at most). Then see docs/gpu.md.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
# shellcheck disable=SC1091
source .venv/bin/activate
bash ../shared/gpu/prepare-carry.sh                # .gpu-carry/jre (Java 17), .gpu-carry/ts
mkdir -p .gpu-carry/py .gpu-carry/store
site=$(python -c 'import os, timm; print(os.path.dirname(os.path.dirname(timm.__file__)))')
tar cf - -C "$site" timm | xz -6 -T2 > .gpu-carry/py/py.txz
# The image model and the small CNN the GPU tests use: about 18 MB.
cp model_store/efficientnet_lite0.mar model_store/digits.mar .gpu-carry/store/
du -sh .gpu-carry/*
