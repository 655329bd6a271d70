#!/usr/bin/env bash
# The one prepared run for a lent GPU (the library's device tool; an H200 has torch, transformers and lightning but
# not open_clip, soundfile or jsonargparse, and no network). From this machine:
#   1. once: echo /.whl/ >> .git/info/exclude and download the missing wheels for the device's Python 3.12:
#      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#        open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 \
#        jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0
#   2. device run: command "bash benchmarks/gpu_run.sh", carry [".whl"], timeout_s 540 (each step has its own timeout,
#      480 s in all; gpu_checks keeps what finished if a later stage overruns).
# What comes back under $OUT (8 files at most): gpu_checks.{json,md} (kernel and engine exactness on the GPU,
# continuous vs static, low-latency P99), moe_gpu.{json,md} (benchmarks/moe.py in bf16 on the GPU), fit.log (the
# demo recipe trained for 60 steps in bf16-mixed on the GPU), machine.txt and run.log.
set -uo pipefail
OUT=${OUT:-/tmp/mmr1_gpu_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1
if [ "${DRY_RUN:-0}" != 1 ] && compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; python3 -c \
    "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__)"; } \
    > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
status=0
step() { echo "== $* ($(date +%T))"; "$@" || { echo "!! failed: $*"; status=1; }; }

# DRY_RUN=1: the same steps on this CPU at smoke sizes, to check the script itself before spending device time
if [ "${DRY_RUN:-0}" = 1 ]; then
    device=cpu quick=--quick moe_args="--quick" fit_args="--trainer.accelerator cpu --trainer.precision 32-true --trainer.max_steps 4"
else
    device=cuda quick= moe_args="--dtypes bf16 --budget 1.5"
    fit_args="--trainer.accelerator gpu --trainer.precision bf16-mixed --trainer.max_steps 60"
fi
step timeout 200 python3 -m benchmarks.gpu_checks --device $device $quick --out "$OUT/gpu_checks"
step timeout 120 python3 -m benchmarks.moe --device $device $moe_args --out "$OUT/moe_gpu"
data=/tmp/mmr1_gpu_data run=/tmp/mmr1_gpu_run
step python3 -m mmr1.cli data synth --out "$data" --num-train 512 --num-val 32 --num-test 32 --overwrite
mkdir -p "$run"
# configs/demo.yaml with its data, logs and checkpoints moved to /tmp (nothing of the checkout is written)
step python3 - "$data" "$run" <<'PY'
import sys, yaml
data, run = sys.argv[1:]
cfg = yaml.safe_load(open("configs/demo.yaml"))
cfg["trainer"]["logger"]["init_args"]["save_dir"] = run
for callback in cfg["trainer"]["callbacks"]:
    if "dirpath" in callback.get("init_args", {}):
        callback["init_args"]["dirpath"] = f"{run}/checkpoints"
cfg["model"]["tokenizer"] = f"{data}/tokenizer.json"
cfg["data"].update({f"{split}_manifest": f"{data}/{split}.jsonl" for split in ("train", "val", "test")})
yaml.safe_dump(cfg, open(f"{run}/demo.yaml", "w"), sort_keys=False)
PY
step timeout 120 python3 -m mmr1.cli fit --config "$run/demo.yaml" $fit_args > "$OUT/fit.log" 2>&1
tail -n 25 "$OUT/fit.log"
exit $status
