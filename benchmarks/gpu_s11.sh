#!/usr/bin/env bash
# Session 11's device calls (issue 13, gpu5), run from a copy of the tree with vtest.avi, yolov8n.pt and
# workload.py one folder up (the device tool's .carry/): bash benchmarks/gpu_s11.sh STAGE [STAGE ...]
#   tests   tests/gpu and the interpreter kernel/backend tests on the GPU (pytest-xdist, per-test timeouts
#           long enough for the first Triton/Inductor compiles)
#   scan    kernel/backend tests, peers, triton_gpu and models tests on the GPU in one xdist run
#   yolo    YOLOv8n on vtest.avi with the shipped thresholds file, b1 and N=16, per-kernel profile at b1
#   peers, peers2   R50-3stage 1080p and R18 720p rows against the strongest peer
source "$(dirname "$0")/gpu_env.sh"
for stage in "$@"; do
  stage "$stage"
  case $stage in
  tests)
    timeout 170 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider -n 4 --timeout 160 tests/gpu > "$OUT/gpu_tests_s11_gpu.txt" 2>&1
    tail -25 "$OUT/gpu_tests_s11_gpu.txt"
    timeout 150 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider -n 8 --timeout 140 \
        tests/test_triton_kernels.py tests/test_triton_backend.py > "$OUT/gpu_tests_s11_triton.txt" 2>&1
    tail -25 "$OUT/gpu_tests_s11_triton.txt"
    ;;
  scan)
    timeout 150 python3 -m pytest -q -rA --tb=short -p no:cacheprovider -n 12 --timeout 140 \
        tests/test_triton_kernels.py tests/test_triton_backend.py tests/gpu/test_peers_gpu.py tests/gpu/test_triton_gpu.py \
        tests/gpu/test_models_gpu.py > "$OUT/gpu_tests_s11_scan.txt" 2>&1
    grep -E "passed|failed|FAILED|ERROR|Timeout" "$OUT/gpu_tests_s11_scan.txt" | tail -15
    ;;
  yolo1)
    # b1 only, no profile (at ed2db44 it also ran --scan-off 1, the reverted self-scan's A/B)
    timeout $(( ${LIMIT:-585} - ($(date +%s) - t0) )) python3 benchmarks/gpu_yolo.py --batches 1 \
        --thresholds deltacnn/data/yolov8n_vtest.json --autotune "" --tag s11c 2>&1 \
        | grep -v -e DenseOpsWarning -e "dense tail after" -e "return deltacnn.convert" > "$OUT/gpu_yolo_s11c.txt"
    tail -5 "$OUT/gpu_yolo_s11c.txt"
    ;;
  peers2)
    timeout 270 python3 benchmarks/gpu_peers.py --plan "r50:1:static,sq5,crowd5,sq25,sq100;r18:1:sq5;r18:16:sq5" \
        --autotune "" --variants default --profile r50:1:static --frames 14 --tag s11b \
        > "$OUT/gpu_peers_s11b.txt" 2>&1
    grep -E "^\[|deltacnn=" "$OUT/gpu_peers_s11b.txt" | cut -c1-400 | tail -30
    ;;
  yolo)
    timeout $(( ${LIMIT:-585} - ($(date +%s) - t0) )) python3 benchmarks/gpu_yolo.py --batches 1,16 --thresholds deltacnn/data/yolov8n_vtest.json \
        --autotune "" --profile 1:deltacnn/data/yolov8n_vtest.json --tag s11a 2>&1 \
        | grep -v -e DenseOpsWarning -e "dense tail after" -e "return deltacnn.convert" > "$OUT/gpu_yolo_s11a.txt"
    tail -8 "$OUT/gpu_yolo_s11a.txt"
    ;;
  peers)
    timeout 420 python3 benchmarks/gpu_peers.py --plan "r50:1:static,sq5,crowd5,sq25,sq100;r18:1:sq5;r18:16:sq5" \
        --autotune r50:1 --variants default --profile r50:1:static,r50:1:crowd5 --frames 14 --tag s11b 2>&1 \
        > "$OUT/gpu_peers_s11b.txt"
    tail -25 "$OUT/gpu_peers_s11b.txt"
    ;;
  esac
done
echo "=== done at $(( $(date +%s) - t0 )) s"
