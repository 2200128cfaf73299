#!/usr/bin/env bash
# Session 13's device calls (issue 13 floor, issue 12 item 6's GPU rows; gpu7), run from a copy of the tree
# with vtest.avi, yolov8n.pt, workload.py and (for `base`) the session-12 tree in base/ one folder up (the
# device tool's .carry/): bash benchmarks/gpu_s13.sh TAG STAGE [STAGE ...]
#   tests    the conv / kernel / backend tests on the GPU (incl. the one-wave grid + counter test), xdist
#   floor    R50-3stage 1080p b1 static / sq1 / sq5 / crowd5 / sq25 / sq100 and R18 720p b1 sq5: the one-wave
#            grid ("default") against the 4-programs-per-SM grid of sessions 1-12 (same process), per-kernel
#            profile of the static frame, peers cuDNN + graph and reduce-overhead (FLOOR_VARIANTS: other
#            variants of gpu_peers.py, comma-separated)
#   base     the session-12 tree (../base) on R50 b1 static / sq5, then this tree again with the
#            variants in the other order: the arrival change is only in the tree, not a variant
#   base2    the same two trees in the other order (this tree first)
#   yolo1    YOLOv8n on vtest.avi b1 (795 frames), shipped thresholds file, per-kernel profile
#   yolo16   the same as 16 streams at 3-frame offsets, profiled too with PROF16=1 (YOLO_CAP: seconds at most for either;
#            PROFILE_VARIANTS=default profiles the default setting only; YOLO_AB="NAME=VALUE[,..][;..]"
#            also times and profiles the delta model under those triton_kernels.conv settings, gpu_yolo.py --conv-ab)
#   suite    the lead's post-merge run: all of tests/gpu, then the Triton / delta-decode tests, on the GPU (xdist)
#   dense    keyframe / dense passes against the reduce-overhead peer, YOLOv8n 768x576 b1 and 16 streams, each
#            profiled kernel by kernel (gpu_dense_passes.py --profile; DENSE_CASES, DENSE_VARIANTS override;
#            DENSE_FUSION_LOG=1 also logs Inductor's fusion decisions)
#   densebase the same from the tree in ../base (an A/B of a change to the passes; its DELTACNN_COMMIT: BASE_COMMIT)
#   autotune torch.compile(mode="max-autotune") peer of YOLOv8n b1 (compile time), peers only (AUTOTUNE_CAP: s)
# Logs and JSON go to a scratch folder that is packed into $OUT/s13_TAG.tgz at the end (the tool returns at most
# 8 files). LIMIT (s, default 540): the stages share it; each gets what is left.
TAG=$1; shift
FINAL_OUT=$OUT
export OUT=/tmp/s13_$TAG
mkdir -p "$OUT"
LIMIT=${LIMIT:-540}
source "$(dirname "$0")/gpu_env.sh"
cap() { local l; l=$(left); echo $(( l < $1 ? l : $1 )); }
for st in "$@"; do
  stage "$st"
  [ "$(left)" -lt 20 ] && { echo "no time left for $st"; continue; }
  case $st in
  tests)
    timeout "$(cap 170)" python3 -m pytest -q -rfE --tb=short -p no:cacheprovider -n 8 --timeout 150 \
        tests/gpu/test_triton_gpu.py tests/test_triton_kernels.py tests/test_triton_backend.py \
        tests/test_triton_report.py > "$OUT/gpu_tests_s13_$TAG.txt" 2>&1
    grep -E "programs per SM|FAILED|ERROR|passed|failed|Timeout" "$OUT/gpu_tests_s13_$TAG.txt" | cut -c1-200 | tail -20
    python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_triton_gpu.py -k one_wave 2>&1 | grep "programs per SM"
    ;;
  floor)
    timeout "$(cap 300)" python3 benchmarks/gpu_peers.py --plan "r50:1:static,sq1,sq5,crowd5,sq25,sq100;r18:1:sq5" \
        --autotune "" --variants "${FLOOR_VARIANTS:-default,4 programs/SM}" --profile r50:1:static --frames 14 --tag "s13${TAG}_floor" \
        > "$OUT/gpu_peers_s13${TAG}_floor.txt" 2>&1
    grep -E "profile|^(Memcpy|_|void|sm|nvjet|cutlass)" "$OUT/gpu_peers_s13${TAG}_floor.txt" | cut -c1-110 | head -30
    tail -17 "$OUT/gpu_peers_s13${TAG}_floor.txt" | cut -c1-250
    ;;
  base)
    (cd ../base && export PYTHONPATH=$PWD:$PWD/benchmarks:$PWD/.. DELTACNN_COMMIT=cfc0593 && \
        timeout "$(cap 120)" python3 benchmarks/gpu_peers.py --plan "r50:1:static,sq5" --autotune "" \
        --reduce-overhead none --variants default --profile "" --frames 14 --tag "s13${TAG}_base") \
        > "$OUT/gpu_peers_s13${TAG}_base.txt" 2>&1
    tail -6 "$OUT/gpu_peers_s13${TAG}_base.txt" | cut -c1-250
    timeout "$(cap 120)" python3 benchmarks/gpu_peers.py --plan "r50:1:static,sq5" --autotune "" \
        --reduce-overhead none --variants "4 programs/SM,default" --profile "" --frames 14 --tag "s13${TAG}_again" \
        > "$OUT/gpu_peers_s13${TAG}_again.txt" 2>&1
    tail -10 "$OUT/gpu_peers_s13${TAG}_again.txt" | cut -c1-250
    ;;
  base2)
    # the base A/B in the other order: this tree first, then the session-12 tree
    timeout "$(cap 120)" python3 benchmarks/gpu_peers.py --plan "r50:1:static,sq5" --autotune "" \
        --reduce-overhead none --variants "default,4 programs/SM" --profile "" --frames 14 --tag "s13${TAG}_new" \
        > "$OUT/gpu_peers_s13${TAG}_new.txt" 2>&1
    tail -6 "$OUT/gpu_peers_s13${TAG}_new.txt" | cut -c1-250
    (cd ../base && export PYTHONPATH=$PWD:$PWD/benchmarks:$PWD/.. DELTACNN_COMMIT=cfc0593 && \
        timeout "$(cap 120)" python3 benchmarks/gpu_peers.py --plan "r50:1:static,sq5" --autotune "" \
        --reduce-overhead none --variants default --profile "" --frames 14 --tag "s13${TAG}_base") \
        > "$OUT/gpu_peers_s13${TAG}_base.txt" 2>&1
    tail -4 "$OUT/gpu_peers_s13${TAG}_base.txt" | cut -c1-250
    ;;
  yolo1|yolo16)
    b=${st#yolo}
    prof=""; { [ "$b" = 1 ] || [ -n "${PROF16:-}" ]; } && prof="--profile $b:deltacnn/data/yolov8n_vtest.json"
    timeout "$(cap "${YOLO_CAP:-600}")" python3 benchmarks/gpu_yolo.py --batches "$b" --thresholds deltacnn/data/yolov8n_vtest.json \
        --autotune "" $prof --profile-variants "${PROFILE_VARIANTS:-all}" ${YOLO_AB:+--conv-ab "$YOLO_AB"} \
        --tag "s13${TAG}_yolo$b" 2>&1 | filter > "$OUT/gpu_yolo_s13${TAG}_yolo$b.txt"
    grep -E "graph replay" "$OUT/gpu_yolo_s13${TAG}_yolo$b.txt" | cut -c1-200
    tail -4 "$OUT/gpu_yolo_s13${TAG}_yolo$b.txt" | cut -c1-330
    ;;
  suite)
    # the lead's post-merge run: every GPU test (tests/gpu), then the Triton and delta-decode tests on the GPU
    timeout "$(cap 400)" python3 -m pytest -q -rfE --tb=short -p no:cacheprovider -n 12 --timeout 360 tests/gpu \
        > "$OUT/gpu_suite_s13_$TAG.txt" 2>&1
    grep -E "FAILED|ERROR|passed|failed|Timeout" "$OUT/gpu_suite_s13_$TAG.txt" | cut -c1-200 | tail -20
    timeout "$(cap 150)" python3 -m pytest -q -rfE --tb=short -p no:cacheprovider -n 12 --timeout 140 \
        tests/test_triton_kernels.py tests/test_triton_backend.py tests/test_triton_report.py tests/test_delta_decode.py \
        > "$OUT/triton_suite_s13_$TAG.txt" 2>&1
    grep -E "FAILED|ERROR|passed|failed|Timeout" "$OUT/triton_suite_s13_$TAG.txt" | cut -c1-200 | tail -20
    ;;
  dense)
    # DENSE_FUSION_LOG=1: Inductor's fusion decisions (why two kernels were not fused) into fusion_TAG.log
    [ -n "${DENSE_FUSION_LOG:-}" ] && export TORCH_LOGS="fusion" TORCH_LOGS_OUT="$OUT/fusion_$TAG.log"
    timeout "$(cap "${DENSE_CAP:-300}")" python3 benchmarks/gpu_dense_passes.py --cases "${DENSE_CASES:-yolo:1,yolo:16}" \
        --variants "${DENSE_VARIANTS:-inductor}" --profile --tag "s13${TAG}_dense" 2>&1 | filter > "$OUT/gpu_dense_s13${TAG}.txt"
    grep -E "GPU kernel time|case|inductor|none" "$OUT/gpu_dense_s13${TAG}.txt" | grep -v "^\[" | cut -c1-200 | tail -30
    unset TORCH_LOGS TORCH_LOGS_OUT
    [ -f "$OUT/fusion_$TAG.log" ] && grep -o "cannot fuse.*" "$OUT/fusion_$TAG.log" | sed 's/buf[0-9]*/buf/g; s/op[0-9]*/op/g' | sort | uniq -c | sort -rn | head -8
    # Inductor's generated code of the passes (which state writes it fused), for reading offline
    find /tmp/torchinductor_* -name "*.py" -size -4M 2>/dev/null | tar czf "$OUT/inductor_code_$TAG.tgz" -T - 2>/dev/null
    ;;
  densebase)
    (cd ../base && export PYTHONPATH=$PWD:$PWD/benchmarks:$PWD/.. DELTACNN_COMMIT=${BASE_COMMIT:-base} && \
        timeout "$(cap "${DENSE_CAP:-300}")" python3 benchmarks/gpu_dense_passes.py --cases "${DENSE_CASES:-yolo:1,yolo:16}" \
        --variants "${DENSE_VARIANTS:-inductor}" --profile --tag "s13${TAG}_densebase") 2>&1 | filter \
        > "$OUT/gpu_densebase_s13${TAG}.txt"
    grep -E "GPU kernel time|case|inductor|none" "$OUT/gpu_densebase_s13${TAG}.txt" | grep -v "^\[" | cut -c1-200 | tail -30
    ;;
  autotune)
    timeout "$(cap "${AUTOTUNE_CAP:-600}")" python3 benchmarks/gpu_yolo.py --batches 1 --autotune 1 --peers-only --tag "s13${TAG}_autotune" 2>&1 \
        | filter > "$OUT/gpu_yolo_s13${TAG}_autotune.txt"
    grep -E "peer compile|strongest" "$OUT/gpu_yolo_s13${TAG}_autotune.txt" | cut -c1-400
    tail -4 "$OUT/gpu_yolo_s13${TAG}_autotune.txt" | cut -c1-330
    ;;
  esac
  # packed again after every stage: a call cut by the device's time limit still returns the stages it finished
  tar czf "$FINAL_OUT/s13_$TAG.tgz" -C "$OUT" .
done
echo "=== done at $(( $(date +%s) - t0 )) s"
tar czf "$FINAL_OUT/s13_$TAG.tgz" -C "$OUT" .
