#!/usr/bin/env bash
# Issue #16's one prepared GPU call: scenarios/paper_gpu.yaml on a lent H200, then the CUDA
# training-throughput benchmarks with the time left. The device machine has torch and most of
# wmbench's dependencies but not torch-pruning, and ../shared does not travel (64 MiB at most), so:
#
#   bash scripts/device_paper_gpu.sh prepare    # here, before each call: .device/ = CIFAR-10 pack (~20 MB),
#                                               # the torch-pruning wheel and a wheel of this checkout
#
# then one call of the device tool, carry [".device"], command:
#
#   bash scripts/device_paper_gpu.sh run        # ~9.5 minutes: timeout_s 600
#
# It writes $OUT/paper_gpu.jsonl (the results store), $OUT/run.log and, time permitting,
# $OUT/bench.json. A call that runs out of time keeps its finished cells: copy $OUT/paper_gpu.jsonl
# to leaderboard/in_progress/paper_gpu.jsonl and call again (the store is resumed from there).
# Then, here: wmbench leaderboard leaderboard/in_progress/paper_gpu.jsonl --out leaderboard
# (rename to paper_gpu.*) and publish with the machine and wall time of the calls.
set -uo pipefail
cd "$(dirname "$0")/.."
TIME_LIMIT=${TIME_LIMIT:-570}  # seconds for the whole call, setup included; the tool's limit is 600

prepare() {
    mkdir -p .device
    python3 -m wmbench.jpeg_pack pack "${CIFAR10:-../shared/data/cifar10}" .device/cifar10.npz || exit 1
    version=$(python3 -c 'import importlib.metadata as m; print(m.version("torch-pruning"))')
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .device "torch-pruning==$version" || exit 1
    rm -f .device/wmbench-*.whl
    python3 -m pip wheel -q --no-deps --no-build-isolation -w .device . || exit 1  # built here: no build step there
    ls -la .device
}

run() {
    local start=$SECONDS out=${OUT:?OUT is the device tool folder}
    export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/*.whl || exit 1
    python3 -m wmbench.jpeg_pack unpack .device/cifar10.npz /tmp/cifar10 || exit 1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/machine.txt"
    python3 -c 'import torch; print("torch", torch.__version__, "threads", torch.get_num_threads())' | tee -a "$out/machine.txt"
    [ -f leaderboard/in_progress/paper_gpu.jsonl ] && cp leaderboard/in_progress/paper_gpu.jsonl "$out/paper_gpu.jsonl"
    timeout $((TIME_LIMIT - (SECONDS - start) - 60)) python3 -m wmbench run scenarios/paper_gpu.yaml \
        --store "$out/paper_gpu.jsonl" --cache /tmp/wmcache --out /tmp/lb -q \
        --set datasets[0].args.layout=imagefolder --set datasets[0].args.root=/tmp/cifar10 "$@" 2>&1 | tee "$out/run.log"
    echo "paper_gpu: $((SECONDS - start)) s since the call began" | tee -a "$out/run.log"
    left=$((TIME_LIMIT - (SECONDS - start)))
    if [ "$left" -gt 45 ]; then
        timeout "$left" python3 -m pytest tests/perf/test_training_throughput.py -m perf -k cuda -q \
            --benchmark-json "$out/bench.json" 2>&1 | tail -20
    fi
}

case "${1:-}" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    *) echo "usage: $0 prepare | run [wmbench run options]" >&2; exit 2 ;;
esac
