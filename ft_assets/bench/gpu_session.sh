#!/usr/bin/env bash
# The CUDA checks and GPU measurements in one run, for a lent GPU machine (issue 18).
#
# What it needs there: Python 3.12 with torch (CUDA), transformers, peft; the rest as cp312 wheels
# in .whl/ (run 2026-11-30 with: datasets 5.2.0, dill 0.4.1, multiprocess 0.70.19, trl 1.16.0,
# bitsandbytes 0.50.2 (its other CUDA/ROCm libraries removed to fit what may travel), liger-kernel
# 0.8.5, peft 0.21.0, pydantic 2.14.4, pydantic_core 2.50.5, annotated-types, typing-inspection,
# typing_extensions 4.16.0), and the SmolLM2 tokenizer in .gpu/tokenizer (saved here with
# `AutoTokenizer.from_pretrained(<bundled GGUF dir>, gguf_file=...).save_pretrained(...)`: the 98 MB
# GGUF does not travel, so the models are random-init real configurations). Each phase has its own time limit and a failure does not stop the next one;
# everything lands in $OUT: the log, pytest's junit file, the benchmark results files.
#
#   OUT=/tmp/gpu bash ft_assets/bench/gpu_session.sh [phase ...]   # phases: env tests big 1b lora qlora (default: all, the unmeasured first)
set -u
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TORCHINDUCTOR_COMPILE_THREADS=16
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || { echo "wheel install failed"; exit 1; }
fi
TOK=${FT_TEST_TOKENIZER_DIR:-$PWD/.gpu/tokenizer}
PHASES=${*:-env tests big 1b lora qlora}
BENCH="python3 -m ft_assets.bench.train_throughput --tokenizer-dir $TOK --out-dir $OUT --eval-rows 32"
t0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - t0 )) s] $*"; }

for phase in $PHASES; do
  case $phase in
    env)
      stamp env
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
      python3 - <<'EOF'
import importlib.metadata as md, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
for p in ("transformers", "peft", "trl", "datasets", "bitsandbytes", "liger-kernel", "pyarrow", "fsspec", "triton", "accelerate"):
    try: print(p, md.version(p))
    except md.PackageNotFoundError: print(p, None)
import torch.nn.attention.varlen as v, inspect; print("varlen_attn", inspect.signature(v.varlen_attn))
EOF
      ;;
    tests)  # the device-aware test modules on cuda
      stamp tests
      FT_TEST_DEVICE=cuda FT_TEST_TOKENIZER_DIR=$TOK timeout 180 python3 -m pytest -q -p no:cacheprovider -rs \
        --junitxml="$OUT/pytest_cuda.xml" ft_assets_tests/training/test_cuda.py ft_assets_tests/training/test_packing.py \
        ft_assets_tests/evaluation/test_merge_and_quantize.py 2>&1 | tail -40
      ;;
    lora)  # SmolLM2-135M LoRA: ours vs TRL defaults vs TRL best (packing + Liger), batch 16
      stamp lora
      timeout 130 $BENCH --random-init smollm2-135m --steps 20 --warmup-steps 3 --batch-size 16 --trl-pack-len 2560 \
        --configs ours,trl-defaults,trl-best --tag smollm2-135m-lora 2>&1 | grep -v Warning | tail -30
      ;;
    1b)  # Llama-3.2-1B LoRA: MFU, at 128 rows (about 21k tokens) per step
      stamp 1b
      timeout 120 $BENCH --random-init llama3.2-1b --steps 10 --warmup-steps 3 --batch-size 128 --trl-pack-len 5120 \
        --configs ours,trl-best --tag llama3.2-1b-lora 2>&1 | grep -v Warning | tail -25
      ;;
    qlora)  # SmolLM2-135M QLoRA (NF4 base)
      stamp qlora
      timeout 90 $BENCH --random-init smollm2-135m --quantize nf4 --steps 15 --warmup-steps 3 --batch-size 16 \
        --trl-pack-len 2560 --configs ours,trl-best --tag smollm2-135m-qlora 2>&1 | grep -v Warning | tail -25
      ;;
    big)  # SmolLM2-135M at 128 rows (about 21k tokens) per step, TRL best with as many tokens per forward
      stamp big
      timeout 90 $BENCH --random-init smollm2-135m --steps 10 --warmup-steps 3 --batch-size 128 --trl-pack-len 2560 \
        --configs ours,trl-best --tag smollm2-135m-lora-b128 2>&1 | grep -v Warning | tail -25
      ;;
  esac
  pkill -f "train_throughput.*--worker" 2>/dev/null  # a timed-out phase leaves its worker process behind
done
stamp done
