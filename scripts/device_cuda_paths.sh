#!/usr/bin/env bash
# The CUDA checks of every code path that had not run on a GPU (proposed 2026-12-05, not yet run):
# until then only scenarios/paper_gpu.yaml had (resnet18_cifar in bf16/channels-last; noise,
# magnitude prune, finetune, quantize, key_leak with plain detection). The device machine has torch
# and most of wmbench's dependencies but not torch-pruning, so, as for scripts/device_paper_gpu.sh:
#
#   bash scripts/device_cuda_paths.sh prepare    # here: .device/ = the torch-pruning wheel and a wheel of this checkout
#
# then one call of the device tool, carry [".device"], timeout_s 600, command:
#
#   bash scripts/device_cuda_paths.sh run
#
# (1) scenarios/cuda_paths.yaml on CUDA (every method, resync, every attack, bf16 + channels-last +
# lookahead, tiny synthetic data, small_cnn and resnet18_cifar), then its small_cnn half on the
# machine's CPU (16 cores); a comparison
# lists the cells that failed or were not applicable on one device only and the detection verdicts
# that differ (float differences are expected; a crash or a flipped verdict is a finding);
# (2) checks in Python: the augmentation gives the same pixels on CUDA as on the CPU (its draws come
# from the CPU generator), HufuNet and DeepSigns train with compile: true (inductor), an epoch
# checkpoint of a CUDA training resumes (weights compared with one never stopped: close on CUDA, not
# bit-identical, see README), the null (2 keys) and embed/detect --resync run on CUDA.
# It writes $OUT/{cuda,cpu}.jsonl, compare.txt, checks.log and run.log; exit 1 when a check fails.
set -uo pipefail
cd "$(dirname "$0")/.."
SCENARIO=scenarios/cuda_paths.yaml

prepare() {
    mkdir -p .device
    version=$(python3 -c 'import importlib.metadata as m; print(m.version("torch-pruning"))')
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .device "torch-pruning==$version" || exit 1
    rm -f .device/wmbench-*.whl
    python3 -m pip wheel -q --no-deps --no-build-isolation -w .device . || exit 1
    ls -la .device
}

setup() {
    : "${OUT:?OUT is the device tool folder}"
    export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site WMBENCH_CACHE=/tmp/wmcache WMBENCH_PROBE_SECONDS=0
    if [ ! -f /tmp/setup.done ]; then
        python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .device/*.whl || exit 1
        touch /tmp/setup.done
    fi
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
      python3 -c 'import torch; print("torch", torch.__version__, "threads", torch.get_num_threads())'; } | tee "$OUT/machine.txt"
}

compare() {  # compare CUDA_STORE CPU_STORE: what differs beyond float noise
    python3 -P - "$1" "$2" <<'EOF'
import sys
import pandas as pd
keys = ["model", "method", "attack", "strength"]
a, b = (pd.read_json(p, lines=True) for p in sys.argv[1:3])
a = a[a["model"].isin(set(b["model"]))]  # the CPU arm runs the small model only
a, b = a.set_index(keys), b.set_index(keys)
def state(row):
    if isinstance(row.get("failure"), str):
        return "failed: " + row["failure"][:160]
    note = str(row.get("detect_note") or "")
    for word in ("attack not applicable", "detection not applicable", "resync failed", "resync partial", "left unpermuted", "left at their size"):
        if word in note:
            return word + ": " + note[:160]
    return "ok"
bad = 0
for k in a.index.union(b.index):
    if k not in a.index or k not in b.index:
        print("only on", "CPU" if k not in a.index else "CUDA", k); bad += 1; continue
    ra, rb = a.loc[k], b.loc[k]
    sa, sb = state(ra), state(rb)
    if sa != sb or sa.startswith("failed"):
        print(k, "| CUDA:", sa, "| CPU:", sb); bad += 1
    elif str(ra.get("detected")) != str(rb.get("detected")):
        print(k, "| verdict CUDA", ra.get("detected"), ra.get("detect_pvalue"), "| CPU", rb.get("detected"), rb.get("detect_pvalue")); bad += 1
print(f"{len(a)} CUDA rows, {len(b)} CPU rows, {bad} differences")
sys.exit(1 if bad else 0)
EOF
}

checks() {
    python3 -P - <<'EOF'
import copy, functools, torch
from wmbench.augment import Augment
from wmbench.registry import DATASETS, METHODS, MODELS
from wmbench.train import Trainer, TrainingConfig
from wmbench.checkpoint import EpochCheckpoints
cuda, cpu = torch.device("cuda"), torch.device("cpu")
x = torch.randn(64, 3, 16, 16); y = torch.randint(0, 4, (64,))
for aug in (Augment(4, True, 6),):
    a = aug(x, y, torch.Generator().manual_seed(3))[0]
    b = aug(x.to(cuda), y.to(cuda), torch.Generator().manual_seed(3))[0].cpu()
    assert torch.equal(a, b), "augmentation differs on CUDA"
print("augment: same pixels on CUDA and CPU")
data = DATASETS.build("synthetic", {"n_train": 256, "n_test": 64, "size": 16}).load(None)
for name in ("hufunet", "deepsigns"):
    torch.manual_seed(0)
    model = MODELS.build("small_cnn", {"width": 16, "hidden": 32}).build(data)
    trainer = Trainer(data, TrainingConfig(epochs=2, batch_size=64, compile=True, precision="bf16"), cuda, torch.Generator().manual_seed(0), progress=False)
    key = METHODS.build(name).embed(model, trainer, torch.Generator().manual_seed(1))
    print(f"compile (inductor) {name}: p = {METHODS.build(name).detect(model, key).pvalue:.3g}")
# a resumed CUDA training: stopped after epoch 1 of 3 (its checkpoint), continued, compared with one never stopped
EpochCheckpoints.min_interval_s = 0.0
def train(stop, directory):
    torch.manual_seed(0)
    model = MODELS.build("resnet18_cifar").build(data)
    trainer = Trainer(data, TrainingConfig(epochs=3, batch_size=64, lookahead=True), cuda, torch.Generator().manual_seed(0), progress=False)
    trainer.checkpoints = EpochCheckpoints(directory, {"train_id": "t"}, cuda)
    if stop:
        original = trainer.checkpoints.save
        def save(fit, epoch, *args):
            original(fit, epoch, *args)
            if epoch == 1:
                raise KeyboardInterrupt
        trainer.checkpoints.save = save
    from wmbench.api import plain_step
    try:
        trainer.fit(model, plain_step)
    except KeyboardInterrupt:
        return None
    return model
import tempfile, pathlib
d = pathlib.Path(tempfile.mkdtemp())
whole = train(False, d / "whole")
assert train(True, d / "resumed") is None
resumed = train(False, d / "resumed")
gap = max(float((a - b).abs().max()) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()) if a.is_floating_point())
print(f"resume on CUDA: largest weight difference to a training never stopped {gap:.3g} (0: bit-identical)")
EOF
}

run() {
    local start=$SECONDS out=${OUT:?OUT is the device tool folder} failed=0
    local small=(--set 'models=[{name: small_cnn, args: {width: 16, hidden: 32}}]')
    setup
    # The stores live in /tmp: a second call on the warm machine resumes a grid the first left unfinished.
    timeout 280 python3 -P -m wmbench run "$SCENARIO" --device cuda --store /tmp/cuda.jsonl --out /tmp/lb_cuda -q >"$out/run.log" 2>&1 \
        || { tail -30 "$out/run.log"; failed=1; }
    cp /tmp/cuda.jsonl "$out/"; echo "cuda grid: $((SECONDS - start)) s"
    timeout 100 python3 -P -m wmbench run "$SCENARIO" --device cpu --store /tmp/cpu.jsonl --out /tmp/lb_cpu -q "${small[@]}" >>"$out/run.log" 2>&1 \
        || { tail -30 "$out/run.log"; failed=1; }
    cp /tmp/cpu.jsonl "$out/"; echo "cpu grid (small_cnn only): $((SECONDS - start)) s"
    compare "$out/cuda.jsonl" "$out/cpu.jsonl" > "$out/compare.txt" || failed=1
    tail -40 "$out/compare.txt"
    { checks && timeout 45 python3 -P -m wmbench null "$SCENARIO" --device cuda --keys 2 -q \
          "${small[@]}" --set 'methods=[none, watermas, {name: watermas, label: w+resync, resync: true}, uchida]' \
          --set 'attacks=[{name: permute, strengths: [1.0]}, {name: key_leak, strengths: [0.5]}]' --out /tmp/null \
      && timeout 45 python3 -P -m wmbench embed "$SCENARIO" --device cuda --method watermas --model small_cnn --out-model /tmp/m.safetensors \
          --out-key /tmp/k.safetensors --force -q \
      && python3 -P -m wmbench detect --model /tmp/m.safetensors --key /tmp/k.safetensors --resync --reference /tmp/m.safetensors; } >"$out/checks.log" 2>&1 \
        || failed=1
    tail -20 "$out/checks.log"
    echo "call: $((SECONDS - start)) s, $([ $failed = 0 ] && echo 'all checks passed' || echo 'a check FAILED')"
    exit $failed
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    compare) shift; compare "$@" ;;
    *) echo "usage: $0 prepare | run | compare CUDA_STORE CPU_STORE" >&2; exit 2 ;;
esac
