#!/usr/bin/env bash
# One command that checks the CUDA paths on a GPU machine and prints a PASS/FAIL summary.
#
#     bash scripts/gpu_check.sh                       # this repo only
#     bash scripts/gpu_check.sh /path/to/minimind     # the benchmark also runs MiniMind side by side
#     NPROC=2 STAGE_TIMEOUT=1200 bash scripts/gpu_check.sh
#     PARALLEL=1 bash scripts/gpu_check.sh            # independent stages at once (a big card: ~3x faster overall)
#
# Steps (each under `timeout`, each a PASS/FAIL/SKIP line at the end):
#   1. cuda_equivalence: on the GPU, in bf16: the MoE dispatch's grouped GEMM equals the per-expert loop, gradient
#      checkpointing gives the same gradients, model.generate (MiniMind's decode loop) equals transformers' own loop
#      (greedy, left-padded batch), a packed row equals its samples alone.
#   2. the nine seed commands (shared/seeds/000_*.txt: 640x12 MoE + gate, torchrun --nproc_per_node $NPROC,
#      --use_wandb with WANDB_MODE=offline) with --max_steps 20 on dataset/demo/, each stage starting from the
#      weights its default --from_weight names (pretrain -> full_sft -> dpo -> distill_reason -> ppo/grpo/spo; lora
#      and distillation from full_sft), written to a scratch directory instead of out/ and checkpoints/; pretrain
#      once more with --use_compile 1 and once with --grad_checkpointing 1; GRPO once more with the recommended
#      objective and --num_iterations 2 (grpo_mu2); eval_llm.py answers two prompts from stdin with the SFT
#      weights on the GPU.
#   3. bench: scripts/bench_model.py --device cuda --dtype bfloat16 --repeats 3 over 512x8, 512x8_moe, 640x12_moe
#      and the gate-on 640x12_moe_gate, side by side with the MiniMind checkout when one is given.
# Environment: NPROC (default: number of GPUs, at most 2), STAGE_TIMEOUT seconds per command (default 900),
# PARALLEL (0/1, default 0: one command at a time, as on 2 x 24 GB cards), WORK scratch directory (default: a new
# mktemp -d), ALL_LOG (every command's log appended to one file; default $WORK/all.log), PYTHON (default: python),
# HIDDEN / LAYERS / MAX_STEPS (model size and length of the stage commands, default 640 / 12 / 20), RL_GEN_LEN
# (PPO/SPO --max_gen_len; default theirs, 1536), CPU_DRY_RUN=1 (no GPU: run only the stage commands, on the CPU
# with gloo, to check the command lines themselves; use a small HIDDEN/LAYERS/MAX_STEPS), BENCH_CONFIGS (the
# benchmark's --configs, e.g. 640x12_moe_gate alone when device time is short; each config's table is printed as soon
# as it is measured).
set -u

PEER="${1:-}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
STAGE_TIMEOUT="${STAGE_TIMEOUT:-900}"
PARALLEL="${PARALLEL:-0}"
CPU_DRY_RUN="${CPU_DRY_RUN:-0}"
HIDDEN="${HIDDEN:-640}"
LAYERS="${LAYERS:-12}"
WORK="${WORK:-$(mktemp -d -t gpu_check.XXXXXX)}"
ALL_LOG="${ALL_LOG:-$WORK/all.log}"
export WANDB_MODE="${WANDB_MODE:-offline}" WANDB_DIR="$WORK" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ "$CPU_DRY_RUN" = 1 ]; then
  GPUS=0
  NPROC="${NPROC:-1}"
elif ! command -v nvidia-smi >/dev/null 2>&1 ||
     ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check: no CUDA device visible to $PYTHON (nvidia-smi / torch.cuda.is_available()); nothing to check" >&2
  exit 2
else
  GPUS="$(nvidia-smi -L | wc -l)"
  NPROC="${NPROC:-$(( GPUS >= 2 ? 2 : 1 ))}"
fi
mkdir -p "$WORK/out" "$WORK/checkpoints" "$WORK/logs" "$WORK/results"
: >>"$ALL_LOG"
echo "gpu_check: $GPUS GPU(s), NPROC=$NPROC, PARALLEL=$PARALLEL, timeout ${STAGE_TIMEOUT}s per command, scratch $WORK"
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__,
      '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" 2>&1 | tee -a "$ALL_LOG"

STEP=0
# run_step N NAME COMMAND...: log in $WORK/logs/NAME.log (then appended to $ALL_LOG), result line in $WORK/results/
run_step() {
  local slot="$WORK/results/$(printf %02d "$1")_$2" name="$2"; shift 2
  local log="$WORK/logs/$name.log" start=$SECONDS status result
  echo "--- $name: $*"
  timeout --kill-after=30 "$STAGE_TIMEOUT" "$@" >"$log" 2>&1
  status=$?
  local took=$(( SECONDS - start ))
  if [ "$status" -eq 0 ]; then
    result="PASS  $name (${took}s)"
  elif [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    result="FAIL  $name: timed out after ${STAGE_TIMEOUT}s, log $log"
  else
    result="FAIL  $name: exit $status, log $log"
  fi
  echo "$result" >"$slot"
  { echo "=================== $result: $*"; cat "$log"; } >>"$ALL_LOG"
  echo "$result"
}
skip() { STEP=$(( STEP + 1 )); echo "SKIP  $1" >"$WORK/results/$(printf %02d "$STEP")_skip"; }
run() { STEP=$(( STEP + 1 )); run_step "$STEP" "$@"; }
# `together NAME CMD...` is `run`, except that with PARALLEL=1 the `together` commands before a `settle` run at once
together() {
  STEP=$(( STEP + 1 ))
  if [ "$PARALLEL" = 1 ]; then run_step "$STEP" "$@" & else run_step "$STEP" "$@"; fi
}
settle() { wait; }

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

model.activation_checkpointing_enable()  # transformers 5 (gradient_checkpointing_* warn)
c = grads(model, ids)
model.activation_checkpointing_disable()
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
if [ "$CPU_DRY_RUN" = 1 ]; then skip "cuda_equivalence: CPU_DRY_RUN"; else
  run cuda_equivalence "$PYTHON" "$WORK/cuda_equivalence.py" "$ROOT"
fi

# ---------------------------------------------------------------------------------------------------- 2. seed commands
DEMO="$ROOT/dataset/demo"
WANDB=(--use_wandb)
if ! "$PYTHON" -c "import wandb" 2>/dev/null; then
  WANDB=(); skip "--use_wandb: wandb is not installed for $PYTHON (the stages run without it)"
fi
MODEL=(--hidden_size "$HIDDEN" --num_hidden_layers "$LAYERS" --use_moe 1 --headwise_attn_output_gate 1 "${WANDB[@]}")
COMMON=(--max_steps "${MAX_STEPS:-20}" --save_dir "$WORK/out" --checkpoint_dir "$WORK/checkpoints" --save_interval 10)
[ "$CPU_DRY_RUN" = 1 ] && COMMON+=(--device cpu --num_workers 0)
TORCHRUN=(torchrun --nproc_per_node "$NPROC")
# commands running at once each need their own rendezvous port: --standalone picks a free one
[ "$PARALLEL" = 1 ] && TORCHRUN=(torchrun --standalone --nproc_per_node "$NPROC")
cd "$ROOT/trainer" || exit 1
together pretrain "${TORCHRUN[@]}" train_pretrain.py "${MODEL[@]}" "${COMMON[@]}" --data_path "$DEMO/pretrain.jsonl"
together pretrain_compile "${TORCHRUN[@]}" train_pretrain.py "${MODEL[@]}" "${COMMON[@]}" \
  --data_path "$DEMO/pretrain.jsonl" --save_weight pretrain_compiled --use_compile 1
together pretrain_grad_checkpointing "${TORCHRUN[@]}" train_pretrain.py "${MODEL[@]}" "${COMMON[@]}" \
  --data_path "$DEMO/pretrain.jsonl" --save_weight pretrain_ckpt --grad_checkpointing 1
settle
run full_sft "${TORCHRUN[@]}" train_full_sft.py "${MODEL[@]}" "${COMMON[@]}" --data_path "$DEMO/sft.jsonl"
together dpo "${TORCHRUN[@]}" train_dpo.py "${MODEL[@]}" "${COMMON[@]}" --data_path "$DEMO/dpo.jsonl"
together lora "${TORCHRUN[@]}" train_lora.py "${MODEL[@]}" "${COMMON[@]}" --save_dir "$WORK/out/lora" \
  --from_dir "$WORK/out" --data_path "$DEMO/lora_identity.jsonl"
together distillation "${TORCHRUN[@]}" train_distillation.py \
  --student_hidden_size "$HIDDEN" --student_num_layers "$LAYERS" --teacher_hidden_size "$HIDDEN" \
  --teacher_num_layers "$LAYERS" --use_moe 1 --headwise_attn_output_gate 1 \
  "${WANDB[@]}" "${COMMON[@]}" --data_path "$DEMO/sft.jsonl"
EVAL_DEVICE=cuda; [ "$CPU_DRY_RUN" = 1 ] && EVAL_DEVICE=cpu
together eval_llm sh -c 'printf "%s\n" "你好，请介绍一下你自己。" "1+1等于几？" |
  "$0" ../eval_llm.py --weight full_sft --save_dir "$1" --device "$2" --max_new_tokens 64' \
  "$PYTHON" "$WORK/out" "$EVAL_DEVICE"
settle
run distill_reason "${TORCHRUN[@]}" train_distill_reason.py "${MODEL[@]}" "${COMMON[@]}" \
  --data_path "$DEMO/reason.jsonl"
RL_GEN=(); [ -n "${RL_GEN_LEN:-}" ] && RL_GEN=(--max_gen_len "$RL_GEN_LEN")  # PPO/SPO generate up to 1536 tokens
together ppo "${TORCHRUN[@]}" train_ppo.py "${MODEL[@]}" "${COMMON[@]}" --data_path "$DEMO/rlaif.jsonl" \
  --reward_model_path none "${RL_GEN[@]}"
# the seed's GRPO flags, with the demo prompts and no reward model instead of the user's /root/autodl-tmp paths
together grpo env CUDA_LAUNCH_BLOCKING=1 "${TORCHRUN[@]}" train_grpo.py "${MODEL[@]}" "${COMMON[@]}" \
  --data_path "$DEMO/rlaif.jsonl" --reward_model_path none --num_generations 1 --max_gen_len 128 --reasoning 0
# GRPO with the recommended objective (dapo, clip-higher 0.28) and two updates per rollout batch (mu = 2: the second
# has real ratios, so clipping acts): its log lines give rollout tokens/s and peak memory. MAX_STEPS must be even
together grpo_mu2 "${TORCHRUN[@]}" train_grpo.py "${MODEL[@]}" "${COMMON[@]}" --data_path "$DEMO/rlaif.jsonl" \
  --reward_model_path none --save_weight grpo_mu2 --num_generations 4 --num_iterations 2 --loss_type dapo \
  --max_gen_len 128 --reasoning 0
together spo "${TORCHRUN[@]}" train_spo.py "${MODEL[@]}" "${COMMON[@]}" --data_path "$DEMO/rlaif.jsonl" \
  --reward_model_path none "${RL_GEN[@]}"
settle
cd "$ROOT" || exit 1

# ---------------------------------------------------------------------------------------------------- 3. benchmark
BENCH=("$PYTHON" "$ROOT/scripts/bench_model.py" --device cuda --dtype bfloat16 --repeats 3)
[ -n "${BENCH_CONFIGS:-}" ] && BENCH+=(--configs "$BENCH_CONFIGS")
if [ "$CPU_DRY_RUN" = 1 ]; then
  skip "bench: CPU_DRY_RUN"
elif [ -n "$PEER" ]; then
  run bench_vs_peer "${BENCH[@]}" --peer "$PEER"
else
  run bench "${BENCH[@]}"
fi

# ---------------------------------------------------------------------------------------------------- summary
echo
echo "=== gpu_check summary (logs in $WORK/logs, all of them in $ALL_LOG)" | tee -a "$ALL_LOG"
failed=0
for slot in "$WORK"/results/*; do
  line="$(cat "$slot")"
  echo "$line" | tee -a "$ALL_LOG"
  case "$line" in FAIL*) failed=$(( failed + 1 )) ;; esac
done
echo "=== $failed failed" | tee -a "$ALL_LOG"
[ "$failed" -eq 0 ]
