"""Run the training stages end to end on the bundled demo data with a tiny model, then chat with the result.

    python scripts/demo_pipeline.py                      # pretrain -> full_sft -> chat (a few minutes on 2 CPU cores)
    python scripts/demo_pipeline.py --stages all         # every stage that has demo data
    python scripts/demo_pipeline.py --hidden_size 128 --num_hidden_layers 4 --device cuda

It is the tutorial in executable form: each stage is the same command a user types, only with small sizes and
the demo files from dataset/demo/. Weights land in out/ as {stage}_{hidden}.pth, so afterwards
`python eval_llm.py --weight full_sft --hidden_size 128` chats with them. The demo model (~1.6M parameters at the
default 128x4, a few minutes on demo data) answers nonsense by design; the closing lines say what to run next.
"""
import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "dataset" / "demo"

# stage -> (script, stage-specific flags). Order is the training order; later stages read earlier outputs.
STAGES = {
    "pretrain": ("trainer/train_pretrain.py", ["--data_path", DEMO / "pretrain.jsonl", "--epochs", "1",
                                               "--batch_size", "16", "--learning_rate", "2e-3",
                                               "--accumulation_steps", "1", "--max_steps", "200"]),
    "full_sft": ("trainer/train_full_sft.py", ["--data_path", DEMO / "sft.jsonl", "--epochs", "1",
                                               "--batch_size", "16", "--learning_rate", "1e-3"]),
    # "{save_dir}" is the pipeline's --save_dir: LoRA reads the base there and writes its adapters to lora/ inside
    "lora": ("trainer/train_lora.py", ["--data_path", DEMO / "lora_identity.jsonl", "--save_dir", "{save_dir}/lora",
                                       "--from_dir", "{save_dir}", "--epochs", "6", "--batch_size", "16",
                                       "--learning_rate", "5e-3"]),
    "dpo": ("trainer/train_dpo.py", ["--data_path", DEMO / "dpo.jsonl", "--batch_size", "8", "--max_steps", "30",
                                     "--learning_rate", "1e-4"]),
    # "{chat_base}": dpo when this run trains it before, else full_sft (the reference starts reasoning from dpo)
    "distill_reason": ("trainer/train_distill_reason.py", ["--data_path", DEMO / "reason.jsonl", "--from_weight",
                                                           "{chat_base}", "--epochs", "1", "--batch_size", "8",
                                                           "--learning_rate", "1e-4", "--max_steps", "30"]),
    # the teacher is this run's full_sft at the pipeline's size (student = same size, fresh copy of full_sft)
    "distillation": ("trainer/train_distillation.py", ["--data_path", DEMO / "sft.jsonl", "--teacher_hidden_size",
                                                       "{hidden_size}", "--teacher_num_layers", "{num_hidden_layers}",
                                                       "--epochs", "1", "--batch_size", "8", "--learning_rate", "1e-4",
                                                       "--max_steps", "30"]),
    "ppo": ("trainer/train_ppo.py", ["--data_path", DEMO / "rlaif.jsonl", "--reasoning", "0", "--max_gen_len", "24",
                                     "--batch_size", "4", "--max_steps", "20", "--learning_rate", "1e-5",
                                     "--critic_learning_rate", "1e-4"]),
    "grpo": ("trainer/train_grpo.py", ["--data_path", DEMO / "rlaif.jsonl", "--reasoning", "0", "--max_gen_len",
                                       "24", "--num_generations", "4", "--batch_size", "4", "--max_steps", "20",
                                       "--learning_rate", "5e-5"]),
    "spo": ("trainer/train_spo.py", ["--data_path", DEMO / "rlaif.jsonl", "--reasoning", "0", "--max_gen_len", "24",
                                     "--batch_size", "8", "--accumulation_steps", "1", "--max_steps", "20",
                                     "--learning_rate", "5e-5"]),
}
# common flags a stage spells its own way (distillation sizes its student and teacher separately)
RENAMED = {"distillation": {"--hidden_size": "--student_hidden_size", "--num_hidden_layers": "--student_num_layers"}}
DEFAULT_STAGES = ["pretrain", "full_sft"]


def main():
    p = argparse.ArgumentParser(description="Demo pipeline on dataset/demo",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stages", type=str, default=",".join(DEFAULT_STAGES),
                   help=f"comma-separated subset of {list(STAGES)} or 'all'")
    p.add_argument("--hidden_size", type=int, default=128)
    p.add_argument("--num_hidden_layers", type=int, default=4)
    p.add_argument("--use_moe", type=int, default=0, choices=[0, 1])
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument("--max_seq_len", type=int, default=128)
    p.add_argument("--save_dir", type=str, default=str(ROOT / "out"))
    p.add_argument("--checkpoint_dir", type=str, default=str(ROOT / "checkpoints"))
    p.add_argument("--no_chat", action="store_true", help="skip the chat reply at the end")
    args = p.parse_args()

    stages = list(STAGES) if args.stages == "all" else args.stages.split(",")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        sys.exit(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    common = ["--hidden_size", args.hidden_size, "--num_hidden_layers", args.num_hidden_layers,
              "--use_moe", args.use_moe, "--device", args.device, "--max_seq_len", args.max_seq_len,
              "--save_dir", args.save_dir, "--checkpoint_dir", args.checkpoint_dir, "--num_workers", "0",
              "--log_interval", "20"]
    for i, stage in enumerate(stages):
        script, flags = STAGES[stage]
        # "{name}" in a stage's flags: the pipeline's own flag of that name, or chat_base (see STAGES)
        values = {**vars(args), "chat_base": "dpo" if "dpo" in stages[:i] else "full_sft"}
        flags = [re.sub(r"\{(\w+)\}", lambda m: str(values[m.group(1)]), str(f)) for f in flags]
        stage_common = [RENAMED.get(stage, {}).get(str(c), str(c)) for c in common]
        cmd = [sys.executable, str(ROOT / script), *stage_common, *flags]
        print(f"\n=== {stage}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            sys.exit(f"stage {stage} failed")
        print(f"=== {stage} done in {time.time() - t0:.0f}s", flush=True)

    # the chat uses the last chat-model stage's output weight (ppo saves ppo_actor, distill_reason reason)
    outputs = {"full_sft": "full_sft", "dpo": "dpo", "distill_reason": "reason", "distillation": "full_dist",
               "grpo": "grpo", "ppo": "ppo_actor", "spo": "spo"}
    last = [outputs[s] for s in stages if s in outputs]
    weight = last[-1] if last else "full_sft"
    if not args.no_chat:
        cmd = [sys.executable, str(ROOT / "eval_llm.py"), "--weight", weight, "--save_dir", args.save_dir,
               "--hidden_size", str(args.hidden_size), "--use_moe", str(args.use_moe), "--mode", "auto",
               "--device", args.device, "--max_new_tokens", "40", "--temperature", "0.7", "--seed", "0",
               "--prompts", "3 加 4 等于多少？", "What is 5 plus 2?", "你好"]
        print(f"\n=== chat with {weight}: {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    print(closing_words(args, stages, weight), flush=True)


def closing_words(args, stages, weight: str) -> str:
    """What the run showed, what the replies above are worth, and what to type next."""
    sys.path.insert(0, str(ROOT))
    import torch

    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, count_params
    with torch.device("meta"):  # sizes only: no memory, no init
        total, _ = count_params(MiniMindForCausalLM(MiniMindConfig(
            hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers, use_moe=bool(args.use_moe),
            headwise_attn_output_gate=True)))  # the trainers' default
    moe = " --use_moe 1" if args.use_moe else ""
    size = f"--hidden_size {args.hidden_size}{moe}" + ("" if args.save_dir == str(ROOT / "out")
                                                       else f" --save_dir {args.save_dir}")
    more = "" if args.stages == "all" else "\n  every stage (LoRA, DPO, reasoning, distillation, PPO/GRPO/SPO):\n" \
                                            "    python scripts/demo_pipeline.py --stages all"
    return (f"\n=== done: {', '.join(stages)} ran end to end.\n"
            f"The demo model has only {total:.1f}M parameters and trained for minutes on the small demo set, "
            "so its replies are expected to be nonsense: the demo shows that every stage runs, not what a trained "
            "model says. For a model that answers, download MiniMind's datasets and train 512x8 (25.8M) or "
            "640x12 MoE (README: 数据集 / Datasets, 正式训练 / Real training).\n"
            "Next:\n"
            f"  chat with the demo model (type 1 for your own questions):\n"
            f"    python eval_llm.py --weight {weight} {size}\n"
            f"  the same model behind an OpenAI-compatible API and a chat page:\n"
            f"    python scripts/web_demo.py --weight {weight} {size}" + more)


if __name__ == "__main__":
    main()
