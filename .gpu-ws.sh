#!/usr/bin/env bash
# FP8 GEMM warp-specialization experiment (branch s4-fp8ws) on an H100 / H200, from the repo root, output under $OUT.
# One GPU call, <= 6.5 min: (1) test_gpu_ws_tiles_bit_equal alone first (<= 60 s: the ws kernels run, give the
# reference's bits at M = 128 / 200 / 4096, split or not, partial N / K, and launch 12 warps; a hang of the
# experimental Hopper warp specialization shows here, not inside the sweep); (2) the config sweep at M = 128 and
# 4096 only (the M > 64 buckets, where the new candidates ws=True sit beside the old ones), <= 230 s, writing
# $OUT/sm90_fp8_sweep_ws.json and $OUT/sm90_fp8_sweep_ws.log (each line: best us, x cuBLASLt blockwise, the winning
# config and "ws best X us vs Y without": the best ws candidate against the best other one, same run); the bench
# test fails if any candidate's bits differ from the reference; (3) the other FP8 GPU correctness tests (<= 115 s).
# Commit winners afterwards only if ws wins somewhere:
#   python3 -m kernels.sm90.gemm_fp8_block_configs --from-json <files_at>/sm90_fp8_sweep_ws.json
set -o pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/ws_device.txt
timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu -k ws_tiles_bit_equal verify/tests/test_sm90_fp8_gemm.py \
    2>&1 | tee $OUT/sm90_fp8_ws_bits.log
mkdir -p $OUT/ws_sweep
NVFP4V_REPORT_DIR=$OUT/ws_sweep NVFP4V_FP8_SWEEP_M=128,4096 NVFP4V_FP8_SWEEP_BUDGET_S=165 \
    timeout 230 python3 -m pytest -q -p no:cacheprovider -s -m bench verify/tests/test_sm90_fp8_sweep.py \
    -k config_sweep 2>&1 | tee $OUT/sm90_fp8_sweep_ws.log
mv $OUT/ws_sweep/sm90_fp8_sweep.json $OUT/sm90_fp8_sweep_ws.json 2>/dev/null
timeout 115 python3 -m pytest -q -p no:cacheprovider -m "gpu and not bench" \
    -k "not every_sweep_candidate and not ws_tiles_bit_equal" \
    verify/tests/test_sm90_fp8_gemm.py verify/tests/test_sm90_fp8_wire.py 2>&1 | tee $OUT/sm90_fp8_gpu_tests_ws.log
