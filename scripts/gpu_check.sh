#!/usr/bin/env bash
# The prepared GPU check (docs/gpu.md): every GPU test and the GPU bench in one device call of at
# most 8 minutes, after scripts/gpu_prepare.sh here and the call that unpacks Java there:
#   device call 1, carry .gpu-carry/jre:
#     mkdir -p /opt && tar xJf .gpu-carry/jre/jre.txz -C /opt
#   device call 2, carry .gpu-carry/ts .gpu-carry/py .gpu-carry/store:
#     bash scripts/gpu_check.sh
# Figures land in $OUT (the device tool brings them back) or build/gpu.
set -uo pipefail
out=${OUT:-build/gpu}
mkdir -p "$out" /tmp/site
tar xJf .gpu-carry/ts/ts.txz -C /tmp/site && tar xJf .gpu-carry/py/py.txz -C /tmp/site
# No pip install there: the project's packages (scripts, models, handler_kit) from the tree.
export PYTHONPATH=/tmp/site:$PWD:$PWD/handlers PATH=/opt/jre/bin:$PATH JAVA_HOME=/opt/jre
cp .gpu-carry/store/*.mar model_store/
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))' | tee "$out/torch.txt"

timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_gpu.py tests/gpu/test_gpu_oom.py \
  tests/handler/test_profiling.py > "$out/gpu-tests.txt" 2>&1
echo "GPU tests: rc=$? ($(tail -1 "$out/gpu-tests.txt"))"

# In-process: fp32 vs fp16 channels_last handler vs batched device JPEG decoding + fp16.
timeout 150 python3 -m scripts.bench.gpu_bench --batches 64,256 --seconds 5 --out "$out" \
  > "$out/gpu-bench.txt" 2>&1
echo "GPU bench: rc=$?"; grep -h '^\[gpu-bench\]' "$out/gpu-bench.txt" | tail -8

# Served end to end (JPEG in, top-k out) at concurrency 256: the archive as built (b) against
# in-process (a). No wrk there: the Python client, on the machine's 16 cores.
timeout 170 python3 -m scripts.bench --models efficientnet_lite0 --families image --only a,b \
  --skip-variants --skip-echo --client python --concurrency 256 --seconds 20 --in-process-seconds 10 \
  > "$out/served.txt" 2>&1
echo "served bench: rc=$?"; tail -25 "$out/served.txt"
cp build/bench/latest.* "$out/" 2>/dev/null || true
