#!/usr/bin/env bash
# One device call: environment, NCCL bench, FSDP2 bench, colocated bench, GPU tests.
# Usage (on a machine with 2 GPUs): OUT=/some/dir bash scripts/gpu_check.sh [steps...]
# Steps: env nccl nccltiny moe unpacked fsdp fsdpplain fsdpfree fsdp256 fsdpnccl fsdpoff fsdpprof fsdpgpu fsdptl fsdptl256 overlap fsdptests peer peerx peerbw ipc ipcab ipctests tlunpacked tlpacked lagab bcastmodes trace256 beginlat tlipc ipcfull packcont pushpull twosource cudatests tests (default: env nccl fsdp ipc tests). Each step is
# bounded by its own timeout so one hang cannot eat the call; logs go under $OUT.
# The steps overlap, fsdpgpu, fsdptl, fsdptl256 and peerbw run throwaway diagnostics from .diag/,
# which is not in the repository (carry it to the device); bcastmodes, packcont, pushpull, twosource, beginlat, trace256 and
# fsdpprof use scripts/diag_*.py and scripts/trace_summary.py; the others need nothing else.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/gpu_check}"; mkdir -p "$OUT"
steps=("$@"); [ ${#steps[@]} -eq 0 ] && steps=(env nccl fsdp ipc tests)
for s in "${steps[@]}"; do
  echo "=== $s $(date +%T)"
  case $s in
    env) nvidia-smi -L; python3 -c "import torch; print(torch.__version__, torch.cuda.nccl.version(), torch.cuda.device_count())" ;;
    nccl) timeout 200 python3 scripts/bench.py --backend nccl --device cuda --workers 1 \
            --layouts transformer,huge,tiny --modes flat,packed,seed,per-tensor \
            --buffer-mib 1024,256 --num-buffers 2 --repeats 3 --out "$OUT/nccl.json" \
            --cprofile /tmp/cp_nccl --profile-layouts tiny,transformer 2>&1 | grep -v "] {'layout'" | tail -60
          cat /tmp/cp_nccl/cprofile_rank*.txt > "$OUT/cprofile_nccl.txt" ;;
    nccltiny) timeout 150 python3 scripts/bench.py --backend nccl --device cuda --workers 1 \
            --layouts tiny --modes flat,packed,seed --buffer-mib 1024,256 --num-buffers 2 --repeats 5 \
            --out "$OUT/nccl_tiny.json" 2>&1 | grep -v "] {'layout'" | tail -12 ;;
    unpacked) timeout 150 python3 scripts/bench.py --backend nccl --device cuda --workers 1 \
            --layouts transformer,huge --modes flat,per-tensor,unpacked --repeats 3 --out "$OUT/unpacked.json" 2>&1 | tail -20 ;;
    moe) timeout 200 python3 scripts/bench.py --backend nccl --device cuda --workers 1 \
            --layouts moe --modes flat,packed,seed --buffer-mib 1024 --num-buffers 2 --repeats 3 --out "$OUT/moe.json" 2>&1 | tail -20 ;;
    fsdpprof) timeout 100 python3 scripts/bench_fsdp.py --out /tmp/fsdp_prof.json --repeats 2 --profile /tmp/pf_fsdp 2>&1 | tail -3
          for f in /tmp/pf_fsdp/*.json; do python3 scripts/trace_summary.py "$f"; done > "$OUT/fsdp_trace.txt" 2>&1; tail -5 "$OUT/fsdp_trace.txt" ;;
    fsdptests) timeout 200 python3 -m pytest -q tests/test_fsdp.py tests/test_sharded.py tests/test_colocated.py -k "nccl or cuda" 2>&1 | tee "$OUT/fsdp_tests.log" | tail -15 ;;
    peer) timeout 300 python3 -m pytest -q tests/test_peer_reads.py tests/test_fsdp.py -k "gpus or nccl" 2>&1 | tee "$OUT/peer_tests.log" | tail -15 ;;
    fsdpnccl) timeout 100 python3 scripts/bench_fsdp.py --lockstep nccl --out "$OUT/fsdp_nccl.json" 2>&1 | tail -4 ;;
    peerx) timeout 150 python3 -m pytest -q tests/test_peer_reads.py -k expandable 2>&1 | tee "$OUT/peerx_tests.log" | tail -5 ;;
    peerbw) timeout 60 python3 .diag/peerbw.py 2>&1 | tail -8 ;;
    overlap) timeout 100 python3 .diag/overlap.py 2>&1 | tail -3 ;;
    fsdpgpu) for m in 1024 256; do MIB=$m timeout 100 python3 .diag/fsdp_gpu.py 2>&1 | grep "^rank" | tail -6; done ;;
    fsdp256) timeout 100 python3 scripts/bench_fsdp.py --buffer-mib 256 --out "$OUT/fsdp_256.json" 2>&1 | tail -3 ;;
    fsdptl) timeout 130 python3 .diag/fsdp_timeline.py 2>&1 | grep "^rank" | tail -6 ;;
    fsdptl256) MIB=256 timeout 130 python3 .diag/fsdp_timeline.py 2>&1 | grep "^rank" | tail -4 ;;
    fsdpoff) TORCHXFER_PEER_READS=0 timeout 100 python3 scripts/bench_fsdp.py --out "$OUT/fsdp_off.json" 2>&1 | tail -4 ;;
    fsdpplain) timeout 100 python3 scripts/bench_fsdp.py --out "$OUT/fsdp.json" 2>&1 | tail -9 ;;
    fsdpfree) timeout 100 python3 scripts/bench_fsdp.py --free-running --out "$OUT/fsdp_free.json" 2>&1 | tail -9 ;;
    fsdp) timeout 100 python3 scripts/bench_fsdp.py --out "$OUT/fsdp.json" --cprofile /tmp/cp_fsdp 2>&1 | tail -15
          cat /tmp/cp_fsdp/cprofile_rank*.txt > "$OUT/cprofile_fsdp.txt" ;;
    ipc) CUDA_VISIBLE_DEVICES=0 timeout 100 python3 scripts/bench.py --backend gloo --device cuda --workers 1 \
            --layouts transformer,tiny --modes ipc,d2d --buffer-mib 1024,256 --num-buffers 2 --repeats 3 \
            --out "$OUT/ipc.json" --cprofile /tmp/cp_ipc --profile-layouts tiny 2>&1 | grep -v "] {'layout'" | tail -24
          cat /tmp/cp_ipc/cprofile_rank*.txt > "$OUT/cprofile_ipc.txt" ;;
    ipcab) for i in 1 2; do for d in 1 0; do echo "--- direct reads $d, run $i"
             TORCHXFER_DIRECT_READS=$d CUDA_VISIBLE_DEVICES=0 timeout 100 python3 scripts/bench.py --backend gloo \
               --device cuda --workers 1 --layouts transformer --modes ipc,d2d --buffer-mib 1024,256 \
               --num-buffers 2 --repeats 5 --out "$OUT/ipc_direct${d}_$i.json" 2>&1 | tail -3; done; done ;;
    tlunpacked) timeout 100 python3 scripts/bench_timeline.py --out-dir "$OUT/tl_unpacked" --backend nccl --device cuda \
                 --workers 1 --layouts transformer --modes flat,unpacked --repeats 3 2>&1 | tail -4 ;;
    tlpacked) timeout 100 python3 scripts/bench_timeline.py --out-dir "$OUT/tl_packed" --backend nccl --device cuda \
                 --workers 1 --layouts transformer --modes flat,packed --buffer-mib 256 --num-buffers 2 --repeats 3 2>&1 | tail -4 ;;
    lagab) for i in 1 2; do for g in 2 4; do echo "--- status lag $g, run $i"
             timeout 100 python3 scripts/bench.py --backend nccl --device cuda --workers 1 --layouts transformer \
               --modes flat,packed,seed --buffer-mib 256,1024 --num-buffers 2 --repeats 5 --dev sender.STATUS_LAG=$g \
               --out "$OUT/lag${g}_$i.json" 2>&1 | grep -E "^transformer +(packed|seed)" | tail -4; done; done ;;
    bcastmodes) timeout 150 python3 scripts/diag_broadcast_modes.py 2>&1 | grep "^rank0" ;;
    trace256) timeout 150 python3 scripts/bench.py --backend nccl --device cuda --workers 1 --layouts transformer \
               --modes flat,packed,seed --buffer-mib 256 --num-buffers 2 --repeats 3 --profile /tmp/pf256 \
               --profile-modes packed,seed --profile-layouts transformer 2>&1 | tail -4
             python3 scripts/trace_summary.py /tmp/pf256/*.json > "$OUT/trace256.txt" 2>&1; grep -E "==|span" "$OUT/trace256.txt" ;;
    packcont) timeout 200 python3 scripts/diag_pack_contention.py 2>&1 | grep -E "^rank|Error|error" ;;
    beginlat) timeout 100 python3 scripts/diag_control_latency.py 2>&1 | grep "^rank" ;;
    pushpull) timeout 150 python3 scripts/diag_push_pull.py 2>&1 | grep "^rank" ;;
    twosource) timeout 150 python3 scripts/diag_two_source.py 2>&1 | grep -E "^rank0|Error|error" | head -20 ;;
    tlipc) CUDA_VISIBLE_DEVICES=0 timeout 100 python3 scripts/bench_timeline.py --out-dir "$OUT/tl_ipc" --backend gloo \
             --device cuda --workers 1 --layouts transformer --modes ipc --buffer-mib 1024 --num-buffers 2 --repeats 5 2>&1 | tail -3 ;;
    ipcfull) CUDA_VISIBLE_DEVICES=0 timeout 200 python3 scripts/bench.py --backend gloo --device cuda --workers 1 \
            --layouts transformer,tiny --modes ipc,d2d --buffer-mib 1024,256 --num-buffers 2 --repeats 8 \
            --out "$OUT/ipc_full.json" 2>&1 | grep -v "] {'layout'" | tail -14 ;;
    cudatests) timeout 250 python3 -m pytest -q -n 4 tests/test_cuda.py tests/test_sources.py tests/test_peer_reads.py \
            tests/test_sharded.py tests/test_fsdp.py tests/test_nccl.py 2>&1 | tee "$OUT/cuda_tests.log" | tail -6 ;;
    ipctests) timeout 200 python3 -m pytest -q -n 4 tests/test_colocated.py 2>&1 | tee "$OUT/ipc_tests.log" | tail -15 ;;
    tests) { timeout 120 python3 -m pytest -q -n 4 tests/test_colocated.py
             timeout 150 python3 -m pytest -q -n 4 tests/test_nccl.py tests/test_cuda.py; } 2>&1 | tee "$OUT/tests.log" | tail -25 ;;
    *) echo "unknown step $s" ;;
  esac
  echo "=== $s done rc=${PIPESTATUS[0]} $(date +%T)"
done 2>&1 | tee -a "$OUT/gpu_check.log"
