#!/usr/bin/env bash
# The CUDA path, checked on a lent GPU machine in one call (the device tool; CI never has a GPU):
#   bf16 autocast training, fp32 training, FSDP on one GPU, fake-quant numerics on CUDA (bit-exact with the CPU),
#   fake-quant cost against a matmul. Packages the image lacks travel as wheels in .whl/ (see the README).
# Usage there: bash scripts/gpu_check.sh   (results under $OUT)
set -u
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, pyarrow, accelerate; print('torch', torch.__version__, torch.cuda.get_device_name(), '| transformers', transformers.__version__, '| pyarrow', pyarrow.__version__, '| accelerate', accelerate.__version__)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

echo "== 1. numerics on CUDA (the CUDA tests compare with the CPU bit for bit)"
timeout 150 python3 -m pytest -q -p no:cacheprovider -x tests/test_formats.py tests/test_prepare.py -k "cuda or straight or logits_equal" 2>&1 | tail -4

echo "== 2. fake-quant cost on the GPU"
timeout 60 python3 benchmarks/fake_quant.py --device cuda --repeat 20 --tokens 8192 512 2>&1 | grep -v Skipping

run() {  # name, extra flags...
  local name=$1; shift
  timeout 150 "$@" --format int4-block --steps 60 --eval-every 20 --save-every 60 --output /tmp/$name --force \
    > "$OUT/$name.log" 2>&1 || { echo "$name FAILED"; tail -20 "$OUT/$name.log"; }
  cp /tmp/$name/metrics.jsonl "$OUT/$name-metrics.jsonl" 2>/dev/null
}
echo "== 3. training on CUDA: bf16 autocast (default), fp32, FSDP on one GPU (accelerate, FSDP2)"
run bf16 python3 -m gemma3_qat.cli train
run fp32 python3 -m gemma3_qat.cli train --mixed-precision no
cat > /tmp/fsdp1.yaml <<'YAML'
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_processes: 1
num_machines: 1
mixed_precision: bf16
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: Gemma3DecoderLayer
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
  fsdp_offload_params: false
YAML
run fsdp accelerate launch --config_file /tmp/fsdp1.yaml -m gemma3_qat.cli train
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
runs = {n: [json.loads(l) for l in (out / f"{n}-metrics.jsonl").read_text().splitlines()]
        for n in ("bf16", "fp32", "fsdp") if (out / f"{n}-metrics.jsonl").exists()}
for n, rows in runs.items():
    v = [r for r in rows if "val_kl" in r]
    t = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][5:]
    mem = max((r.get("peak_mem_mb", 0) for r in rows), default=0)
    print(f"{n:5s} val_kl " + " -> ".join(f"{r['val_kl']:.4f}@{r['step']}" for r in v)
          + f" | {sum(t) / max(len(t), 1):.0f} tok/s | peak {mem:.0f} MB | final loss {rows[-1].get('loss', float('nan')):.4f}")
if "bf16" in runs and "fsdp" in runs:
    a = [r["loss"] for r in runs["bf16"] if "loss" in r]; b = [r["loss"] for r in runs["fsdp"] if "loss" in r]
    print("max |loss(fsdp) - loss(bf16, no FSDP)| over", len(a), "steps:", max(abs(x - y) for x, y in zip(a, b)))
PY
echo "== 4. export of the CUDA-trained run and its exactness (CPU read-back)"
python3 -m gemma3_qat.cli export --to gguf /tmp/bf16 -o "$OUT/bf16.gguf" --force 2>&1 | tail -2
