#!/usr/bin/env bash
# Session 12's device calls (issue 13, gpu6), run from a copy of the tree with vtest.avi, yolov8n.pt and
# workload.py one folder up (the device tool's .carry/): bash benchmarks/gpu_s12.sh STAGE [STAGE ...]
#   tests    the StaticSkip GPU tests and the compiled-runner tests it touches (pytest-xdist)
#   peers    R50-3stage 1080p b1 static / sq1 / sq5 / crowd5: default and the PyTorch report; profiles; peers
#            reduce-overhead and max-autotune
#   yolo1    YOLOv8n on vtest.avi b1, shipped thresholds file: default and the session-11 runner; per-kernel profile
#   launch   what one launch of an empty kernel costs in a replayed graph, by grid size, PDL on / off
#   swap     call 2's report A/B (R50 and YOLOv8n) in the other order
#   autotune torch.compile(mode="max-autotune") peer of YOLOv8n b1 (compile time), peers only
# LIMIT (s, default 585): the stages share it; each gets what is left.
source "$(dirname "$0")/gpu_env.sh"
for stage in "$@"; do
  stage "$stage"
  case $stage in
  tests)
    timeout 150 python3 -m pytest -q -rA --tb=short -p no:cacheprovider -n 8 --timeout 140 \
        tests/gpu/test_static_skip_gpu.py tests/test_triton_report.py tests/gpu/test_stream_pool_gpu.py \
        "tests/gpu/test_models_gpu.py::test_graph_replay_equals_eager" \
        "tests/gpu/test_models_gpu.py::test_compiled_keyframes_replay_and_survive_reset" \
        "tests/gpu/test_models_gpu.py::test_yolov8_on_triton_equals_dense" \
        > "$OUT/gpu_tests_s12.txt" 2>&1
    grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|Timeout" "$OUT/gpu_tests_s12.txt" | cut -c1-160 | tail -40
    python3 -c "import torch; g = torch.cuda.CUDAGraph; print('conditional capture:', [a for a in dir(g) if 'cond' in a or 'if_node' in a], [a for a in dir(torch._C) if 'AllocateCurrent' in a or 'ToPool' in a])"
    ;;
  launch)
    timeout 90 python3 benchmarks/gpu_launch_floor.py > "$OUT/gpu_launch_floor_s12.txt" 2>&1
    tail -12 "$OUT/gpu_launch_floor_s12.txt"
    ;;
  peers)
    # R50 b1 with both compiled peers in the group (reduce-overhead and max-autotune: the rows use the faster)
    timeout $(( $(left) < 400 ? $(left) : 400 )) python3 benchmarks/gpu_peers.py \
        --plan "r50:1:static,sq1,sq5,crowd5" --autotune r50:1 --variants "default,torch report" \
        --profile r50:1:static,r50:1:sq1 --frames 14 --tag s12a > "$OUT/gpu_peers_s12a.txt" 2>&1
    grep -E "^\[|graph replay|failed|Error" "$OUT/gpu_peers_s12a.txt" | cut -c1-330 | tail -30
    tail -12 "$OUT/gpu_peers_s12a.txt"
    ;;
  yolo1)
    timeout $(left) python3 benchmarks/gpu_yolo.py --batches 1 --thresholds deltacnn/data/yolov8n_vtest.json \
        --autotune "" --s11-form 1 --profile 1:deltacnn/data/yolov8n_vtest.json --tag s12b 2>&1 \
        | filter > "$OUT/gpu_yolo_s12b.txt"
    grep -E "graph replay|^\[" "$OUT/gpu_yolo_s12b.txt" | cut -c1-300 | tail -8
    tail -6 "$OUT/gpu_yolo_s12b.txt"
    ;;
  swap)
    # call 3: the report A/B of call 2 in the other order (PyTorch report first), no profiles, reduce-overhead only
    timeout 150 python3 benchmarks/gpu_peers.py --plan "r50:1:static,sq1,sq5,crowd5" --autotune "" \
        --variants "torch report,default" --profile "" --frames 14 --tag s12e > "$OUT/gpu_peers_s12e.txt" 2>&1
    tail -10 "$OUT/gpu_peers_s12e.txt"
    timeout $(left) python3 benchmarks/gpu_yolo.py --batches 1 --thresholds deltacnn/data/yolov8n_vtest.json \
        --autotune "" --s11-form 1 --s11-first --tag s12f 2>&1 | filter > "$OUT/gpu_yolo_s12f.txt"
    tail -4 "$OUT/gpu_yolo_s12f.txt"
    ;;
  autotune)
    timeout $(left) python3 benchmarks/gpu_yolo.py --batches 1 --autotune 1 --peers-only --tag s12d 2>&1 \
        | filter > "$OUT/gpu_yolo_s12d.txt"
    tail -4 "$OUT/gpu_yolo_s12d.txt"
    ;;
  esac
done
echo "=== done at $(( $(date +%s) - t0 )) s"
