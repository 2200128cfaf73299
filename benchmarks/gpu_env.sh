# Shared preamble of the per-session device scripts (benchmarks/gpu_s1*.sh), sourced from the repository
# root of a copy of the tree with vtest.avi, yolov8n.pt and workload.py one folder up (the device tool's
# .carry/). Sets the environment, records the GPU's state and the versions in $OUT/smi.txt, and defines
#   left     seconds left of ${LIMIT:-585} since the preamble ran (stages share it)
#   filter   drops the conversion warnings that fill the benchmarks' logs
#   stage    prints and records the start of stage $1
set -o pipefail
here=$(pwd)
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/ext YOLO_OFFLINE=1 YOLO_CONFIG_DIR=$(mktemp -d)
export DELTACNN_CLIP=$here/../vtest.avi DELTACNN_YOLOV8_PT=$here/../yolov8n.pt
export PYTHONPATH=$here:$here/benchmarks:$here/..
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu,memory.used --format=csv | tee -a "$OUT/smi.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' | tee -a "$OUT/smi.txt"
t0=$(date +%s)
left() { echo $(( ${LIMIT:-585} - ($(date +%s) - t0) )); }
filter() { grep -v -e DenseOpsWarning -e "dense tail after" -e "return deltacnn.convert"; }
stage() { echo "=== stage $1 at $(( $(date +%s) - t0 )) s" | tee -a "$OUT/smi.txt"; }
