#!/usr/bin/env bash
# One command that checks the CUDA paths on a GPU machine and prints a PASS/FAIL summary.
#
#     bash scripts/gpu_check.sh                       # this repo only
#     bash scripts/gpu_check.sh /path/to/minimind     # also benchmark against a MiniMind checkout
#     NPROC=2 STAGE_TIMEOUT=1200 bash scripts/gpu_check.sh
#
# Steps (each under `timeout`, each a PASS/FAIL/SKIP line at the end):
#   1. cuda_equivalence: on the GPU, in bf16: the MoE dispatch's grouped GEMM equals the per-expert loop, model.generate
#      (MiniMind's decode loop) equals transformers' own loop (greedy, left-padded batch), a packed row equals its
#      samples alone, gradient checkpointing gives the same gradients.
#   2. bench: scripts/bench_model.py --device cuda --dtype bfloat16 over 512x8, 512x8_moe, 640x12_moe and the gate-on
#      640x12_moe_gate (and the same with --peer when a MiniMind checkout is given).
#   3. the nine seed commands (shared/seeds/000_*.txt: 640x12 MoE + gate, torchrun --nproc_per_node $NPROC,
#      --use_wandb with WANDB_MODE=offline) with --max_steps 20 on dataset/demo/, each stage starting from the
#      previous one's weights, written to a scratch directory instead of out/ and checkpoints/.
#   4. pretrain once more with --use_compile 1, and with --grad_checkpointing 1 if the trainers have that flag.
# Environment: NPROC (default: number of GPUs, at most 2), STAGE_TIMEOUT seconds per command (default 900),
# WORK scratch directory (default: a new mktemp -d), PYTHON (default: python).
set -u

PEER="${1:-}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
STAGE_TIMEOUT="${STAGE_TIMEOUT:-900}"
WORK="${WORK:-$(mktemp -d -t gpu_check.XXXXXX)}"
export WANDB_MODE="${WANDB_MODE:-offline}" WANDB_DIR="$WORK" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if ! command -v nvidia-smi >/dev/null 2>&1 || ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check: no CUDA device visible to $PYTHON (nvidia-smi / torch.cuda.is_available()); nothing to check" >&2
  exit 2
fi
GPUS="$(nvidia-smi -L | wc -l)"
NPROC="${NPROC:-$(( GPUS >= 2 ? 2 : 1 ))}"
mkdir -p "$WORK/out" "$WORK/checkpoints" "$WORK/logs"
echo "gpu_check: $GPUS GPU(s), NPROC=$NPROC, timeout ${STAGE_TIMEOUT}s per command, scratch $WORK"

declare -a RESULTS=()
run() {  # run NAME COMMAND... ; logs to $WORK/logs/NAME.log
  local name="$1"; shift
  local log="$WORK/logs/$name.log" start=$SECONDS status
  echo "--- $name: $*"
  timeout --kill-after=30 "$STAGE_TIMEOUT" "$@" >"$log" 2>&1
  status=$?
  local took=$(( SECONDS - start ))
  if [ "$status" -eq 0 ]; then
    RESULTS+=("PASS  $name (${took}s)")
  elif [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    RESULTS+=("FAIL  $name: timed out after ${STAGE_TIMEOUT}s, log $log")
  else
    RESULTS+=("FAIL  $name: exit $status, log $log")
  fi
  tail -n 3 "$log"
}

# ---------------------------------------------------------------------------------------------------- 1. equivalence
cat >"$WORK/cuda_equivalence.py" <<'PY'
"""CUDA-only paths against their reference on the GPU (bf16 autocast, the training default there)."""
import sys

import torch

sys.path.insert(0, sys.argv[1])
import model.model_minimind as mm  # noqa: E402
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM  # noqa: E402

dev = torch.device("cuda")
amp = torch.autocast("cuda", dtype=torch.bfloat16)


def tiny(**kw):
    torch.manual_seed(0)
    cfg = MiniMindConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=256, **kw)
    return MiniMindForCausalLM(cfg).to(dev)


def grads(model, ids, **kw):
    model.zero_grad(set_to_none=True)
    with amp:
        out = model(ids, labels=ids, **kw)
    (out.loss + out.aux_loss).backward()
    return out.loss.detach(), [p.grad.clone() for p in model.parameters()]


ids = torch.randint(3, 256, (4, 64), device=dev)
model = tiny(use_moe=True, headwise_attn_output_gate=True).train()
assert mm.grouped_mm_ok(ids.float(), torch.bfloat16), "grouped GEMM not used on this GPU (needs bf16, sm80+)"
a = grads(model, ids)
ok = mm.grouped_mm_ok
mm.grouped_mm_ok = lambda x, dtype: False  # the per-expert loop
b = grads(model, ids)
mm.grouped_mm_ok = ok
torch.testing.assert_close(a[0], b[0], rtol=1e-2, atol=1e-2)
for x, y in zip(a[1], b[1]):
    torch.testing.assert_close(x, y, rtol=5e-2, atol=5e-3)
print("MoE grouped GEMM == per-expert loop (bf16)")

model.gradient_checkpointing_enable()
c = grads(model, ids)
model.gradient_checkpointing_disable()
torch.testing.assert_close(c[0], a[0], rtol=0, atol=0)
print("gradient checkpointing: same loss and gradients")

model.eval()
lengths = [9, 4, 6]
prompt = torch.zeros(3, 9, dtype=torch.long, device=dev)
mask = torch.zeros_like(prompt)
for i, n in enumerate(lengths):
    prompt[i, 9 - n:] = torch.randint(3, 256, (n,), device=dev)
    mask[i, 9 - n:] = 1
gen = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
with torch.no_grad(), amp:
    fast = model.generate(prompt, attention_mask=mask, **gen)
    ref = model.generate(prompt, attention_mask=mask, return_dict_in_generate=True, **gen).sequences
assert torch.equal(fast, ref), (fast, ref)
print("generate: MiniMind decode loop == transformers loop (left-padded batch, bf16)")

samples = [torch.randint(3, 256, (n,), device=dev) for n in (20, 30, 14)]
row = torch.cat(samples)[None]
pos = torch.cat([torch.arange(len(s), device=dev) for s in samples])[None]
with torch.no_grad(), amp:
    packed = model(row, position_ids=pos).logits[0].float()
    off = 0
    for s in samples:
        alone = model(s[None]).logits[0].float()
        torch.testing.assert_close(packed[off:off + len(s)], alone, rtol=0.05, atol=0.05)
        off += len(s)
print("packed row == samples alone (bf16)")
PY
run cuda_equivalence "$PYTHON" "$WORK/cuda_equivalence.py" "$ROOT"

# ---------------------------------------------------------------------------------------------------- 2. benchmark
BENCH=("$PYTHON" "$ROOT/scripts/bench_model.py" --device cuda --dtype bfloat16 --repeats 3)
run bench "${BENCH[@]}"
if [ -n "$PEER" ]; then
  run bench_vs_peer "${BENCH[@]}" --peer "$PEER"
else
  RESULTS+=("SKIP  bench_vs_peer: no MiniMind checkout given (bash scripts/gpu_check.sh /path/to/minimind)")
fi

# ---------------------------------------------------------------------------------------------------- 3. seed commands
DEMO="$ROOT/dataset/demo"
MODEL=(--hidden_size 640 --num_hidden_layers 12 --use_moe 1 --headwise_attn_output_gate 1 --use_wandb)
COMMON=(--max_steps 20 --save_dir "$WORK/out" --checkpoint_dir "$WORK/checkpoints" --save_interval 10)
TORCHRUN=(torchrun --nproc_per_node "$NPROC")
cd "$ROOT/trainer" || exit 1
run pretrain "${TORCHRUN[@]}" train_pretrain.py "${MODEL[@]}" "${COMMON[@]}" --data_path "$DEMO/pretrain.jsonl"
run full_sft "${TORCHRUN[@]}" train_full_sft.py "${MODEL[@]}" "${COMMON[@]}" --data_path "$DEMO/sft.jsonl"
run lora "${TORCHRUN[@]}" train_lora.py "${MODEL[@]}" "${COMMON[@]}" --save_dir "$WORK/out/lora" \
  --from_dir "$WORK/out" --data_path "$DEMO/lora_identity.jsonl"
run dpo "${TORCHRUN[@]}" train_dpo.py "${MODEL[@]}" "${COMMON[@]}" --data_path "$DEMO/dpo.jsonl"
run distill_reason "${TORCHRUN[@]}" train_distill_reason.py "${MODEL[@]}" "${COMMON[@]}" \
  --data_path "$DEMO/reason.jsonl"
run distillation "${TORCHRUN[@]}" train_distillation.py --student_hidden_size 640 --student_num_layers 12 \
  --teacher_hidden_size 640 --teacher_num_layers 12 --use_moe 1 --headwise_attn_output_gate 1 --use_wandb \
  "${COMMON[@]}" --data_path "$DEMO/sft.jsonl"
run ppo "${TORCHRUN[@]}" train_ppo.py "${MODEL[@]}" "${COMMON[@]}" --data_path "$DEMO/rlaif.jsonl" \
  --reward_model_path none
# the seed's GRPO flags, with the demo prompts and no reward model instead of the user's /root/autodl-tmp paths
run grpo env CUDA_LAUNCH_BLOCKING=1 "${TORCHRUN[@]}" train_grpo.py "${MODEL[@]}" "${COMMON[@]}" \
  --data_path "$DEMO/rlaif.jsonl" --reward_model_path none --num_generations 1 --max_gen_len 128 --reasoning 0
run spo "${TORCHRUN[@]}" train_spo.py "${MODEL[@]}" "${COMMON[@]}" --data_path "$DEMO/rlaif.jsonl" \
  --reward_model_path none

# ---------------------------------------------------------------------------------------------------- 4. variants
run pretrain_compile "${TORCHRUN[@]}" train_pretrain.py "${MODEL[@]}" "${COMMON[@]}" \
  --data_path "$DEMO/pretrain.jsonl" --save_weight pretrain_compiled --use_compile 1
if "$PYTHON" train_pretrain.py --help 2>/dev/null | grep -q -- "--grad_checkpointing"; then
  run pretrain_grad_checkpointing "${TORCHRUN[@]}" train_pretrain.py "${MODEL[@]}" "${COMMON[@]}" \
    --data_path "$DEMO/pretrain.jsonl" --save_weight pretrain_ckpt --grad_checkpointing 1
else
  RESULTS+=("SKIP  pretrain_grad_checkpointing: train_pretrain.py has no --grad_checkpointing flag")
fi

# ---------------------------------------------------------------------------------------------------- summary
echo
echo "=== gpu_check summary (logs in $WORK/logs)"
failed=0
for line in "${RESULTS[@]}"; do
  echo "$line"
  case "$line" in FAIL*) failed=$(( failed + 1 )) ;; esac
done
echo "=== $failed failed"
[ "$failed" -eq 0 ]
