#!/usr/bin/env bash
# One prepared check for a 15-minute H200 session: the input-path figures of benchmarks/gpu_input.py.
#
#   bash benchmarks/h200_check.sh            # from the repository root, on the GPU machine
#
# (a)-(c) need only torch, torchvision, timm, numpy, pillow and pyarrow (no Ray, no MLflow); (d) runs only
# when `import ray` works there. One round each (gpu_input.py --repeats 1, its default): single figures,
# indicative only; add --repeats N to a line for median and range when the session has the time. nvidia-smi is sampled during every row (GPU util column) and, for the whole
# run, into $OUT/nvidia-smi.csv when $OUT is set. Each block has its own timeout so one slow block
# (torch.compile's warm-up) cannot eat the session.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/h200_check}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 500 > "$OUT/nvidia-smi.csv" &
SMI=$!
trap 'kill $SMI 2>/dev/null' EXIT
CPUS=$(nproc)
run() { echo; echo "== $*"; timeout "$1" python benchmarks/gpu_input.py --device cuda "${@:2}" 2>&1 | tee -a "$OUT/gpu_input.log"; }
# 1. decode + augment alone (cpu path on all cores; device path: nvJPEG + v2 ops)            ~1 min
run 120 --paths b --images 2048 --cpu-workers "$CPUS"
# 2. VA resnet101 448 px, batch 128: synthetic and plain DataLoader, eager then compile       ~4 min
run 300 --models va --paths a c --images 2048 --batch-size 128 --cpu-workers "$CPUS"
# 3. LORA-V 448 px, batch 32, eager and compile                                               ~3 min
run 240 --models lora_v --paths a c --images 1024 --batch-size 32 --cpu-workers "$CPUS"
# 4. the whole path through Ray Train, when Ray is installed                                  ~3 min
if python -c "import ray" 2>/dev/null; then
  run 240 --models va --modes eager --paths d --images 1536 --batch-size 128
else
  echo; echo "== (d) skipped: ray is not importable here"
fi
kill $SMI 2>/dev/null
python - "$OUT/nvidia-smi.csv" <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if r and r[0] != "timestamp"]
util = [float(r[1].split()[0]) for r in rows if r[1].strip().split()[0].replace('.', '', 1).isdigit()]
if util:
    print(f"\nGPU utilisation over the whole check: mean {sum(util)/len(util):.0f}%, "
          f"samples {len(util)}, >=90%: {sum(u >= 90 for u in util) / len(util):.0%}")
PY
