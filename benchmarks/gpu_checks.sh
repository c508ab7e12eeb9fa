#!/usr/bin/env bash
# The GPU checks of issue 12 as one prepared run, for a CUDA machine without napari.
#
#   bash benchmarks/gpu_checks.sh [PART ...]      (default: env tests semidual steps wppnet)
#
# PARTs: env, tests (the CUDA tests), semidual (c-transform passes against the naive
# baseline at 225,625 × 10,000 and 1,000,000 × 20,000), steps (s/step at the CUDA defaults
# and the published settings), wppnet (README training command, --device cuda --minutes 3,
# predict, evaluate), wppflow (--model wppflow --minutes 5, 16 samples, evaluate with the
# std), psnr (bench_training's PSNR after 1, 3 and 10 GPU minutes: 14 minutes).
# Figures and logs go to $OUT (default ./gpu_out). The SiC data come from $NAPARI_WPP_DATA
# (default ./gpu_data, a git-ignored copy of ../shared/data holding sic/): copy it there
# before sending the working tree to the machine, e.g.
#   mkdir -p gpu_data/sic && cp ../shared/data/sic/{ref_SiC.png,hr_SiC.png,lr_SiC_x4.png,\
#   train_lr_SiC_x4.tif,sic_stack_hr.tif} gpu_data/sic/
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export NAPARI_WPP_DATA="${NAPARI_WPP_DATA:-$PWD/gpu_data}"
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
SIC="$NAPARI_WPP_DATA/sic"
OP=(--scale 4 --sigma 2 --kernel-size 16 --anchor corner --padding circular)
parts=("$@")
[[ ${#parts[@]} -eq 0 ]] && parts=(env tests semidual steps wppnet)

run() {  # run NAME CMD...: stdout+stderr to $OUT/NAME.log, a line with the exit code
    local name=$1
    shift
    local start=$SECONDS
    "$@" >"$OUT/$name.log" 2>&1
    echo "$name: exit $? after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

for part in "${parts[@]}"; do
    case $part in
    env)
        run env bash -c 'date -u; nvidia-smi; python -c "import torch, triton, numpy; \
print(torch.__version__, torch.version.cuda, triton.__version__, numpy.__version__, \
torch.cuda.get_device_name())"'
        ;;
    tests)
        run tests python -m pytest -q -ra -p no:cacheprovider tests/test_semidual_gpu.py \
            tests/test_semidual.py tests/test_flow_inference.py tests/test_training.py \
            tests/test_distributed.py -m "gpu or not slow"
        ;;
    semidual)
        run semidual python benchmarks/bench_semidual.py --device cuda --backend triton,device \
            --sizes 225625x10000,1000000x20000 --data sic,random --skip-solvers --skip-prune
        ;;
    steps)
        run steps python benchmarks/bench_training.py --device cuda --steps 5 --psnr-minutes ""
        ;;
    psnr)
        run psnr python benchmarks/bench_training.py --device cuda --steps 1 \
            --configs ours-defaults --psnr-minutes 1,3,10
        ;;
    wppnet)
        run wppnet-train python -m napari_wpp.cli train --lr-data "$SIC/train_lr_SiC_x4.tif" \
            --reference "$SIC/ref_SiC.png" "${OP[@]}" --minutes 3 --seed 0 --device cuda \
            --out "$OUT/wppnet.safetensors"
        run wppnet-predict python -m napari_wpp.cli predict "$OUT/wppnet.safetensors" \
            "$SIC/lr_SiC_x4.png" --device cuda --out "$OUT/wppnet.tif"
        python -m napari_wpp.cli evaluate "$OUT/wppnet.tif" "$SIC/hr_SiC.png" --json \
            >"$OUT/wppnet.json" 2>>"$OUT/summary.txt"
        echo "wppnet: $(cat "$OUT/wppnet.json")" | tee -a "$OUT/summary.txt"
        ;;
    wppflow)
        run wppflow-train python -m napari_wpp.cli train --model wppflow \
            --lr-data "$SIC/train_lr_SiC_x4.tif" --reference "$SIC/ref_SiC.png" "${OP[@]}" \
            --minutes 5 --seed 0 --device cuda --out "$OUT/wppflow.safetensors"
        run wppflow-predict python -m napari_wpp.cli predict "$OUT/wppflow.safetensors" \
            "$SIC/lr_SiC_x4.png" --samples 16 --save-samples --device cuda \
            --out "$OUT/wppflow.tif"
        python -m napari_wpp.cli evaluate "$OUT/wppflow.tif" "$SIC/hr_SiC.png" \
            --std "$OUT/wppflow_std.tif" --samples "$OUT/wppflow_samples.tif" --json \
            >"$OUT/wppflow.json" 2>>"$OUT/summary.txt"
        echo "wppflow: $(cat "$OUT/wppflow.json")" | tee -a "$OUT/summary.txt"
        ;;
    *)
        echo "unknown part $part (env tests semidual steps psnr wppnet wppflow)" >&2
        exit 2
        ;;
    esac
done
