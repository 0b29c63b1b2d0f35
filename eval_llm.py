"""Chat with a trained checkpoint: a fixed set of test prompts (auto mode) or your own input (interactive).

    python eval_llm.py --weight full_sft                     # sizes come from out/full_sft_*.json
    python eval_llm.py --weight full_sft --mode auto --max_new_tokens 128
    python eval_llm.py --weight full_sft --lora_weight lora_identity
    python eval_llm.py --load_from ./MiniMind2-Small           # a transformers-format model directory

Native weights are out/{weight}_{hidden}{_moe}.pth; the model sizes are read from the .json sidecar next to them,
so they need not be repeated (a flag that contradicts the sidecar is an error). Without a terminal (piped stdin,
CI) the auto mode runs. Replies stream token by token.
"""
import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import TextStreamer  # noqa: E402

from model.model_minimind import MiniMindForCausalLM, count_params  # noqa: E402
from trainer.chat_utils import add_model_args, is_hf_dir, load_model  # noqa: E402
from trainer.trainer_utils import UserError, run_main, setup_seed  # noqa: E402

AUTO_PROMPTS = [
    "你好，请介绍一下你自己。",
    "3 加 4 等于多少？",
    "中国的首都是哪里？",
    "请写一首关于春天的短诗。",
    "What is 12 plus 7?",
    "Explain what a neural network is in one sentence.",
    "如何保持健康的生活习惯？",
    "地球为什么有四季？",
]


def main():
    p = argparse.ArgumentParser(description="Chat with a MiniMind checkpoint",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--max_new_tokens", type=int, default=8192, help="最大生成长度 / max new tokens")
    p.add_argument("--temperature", type=float, default=0.85, help="采样温度 / temperature")
    p.add_argument("--top_p", type=float, default=0.85, help="nucleus sampling top_p")
    p.add_argument("--historys", type=int, default=0, help="携带的历史消息数 (偶数) / past messages kept")
    p.add_argument("--mode", type=str, default=None, choices=["auto", "chat"],
                   help="auto = built-in test prompts, chat = type your own; default asks (auto without a terminal)")
    p.add_argument("--prompts", type=str, nargs="*", default=None, help="prompts for auto mode (default: built-in)")
    p.add_argument("--seed", type=int, default=None, help="固定随机种子 / fix sampling seed (default: random)")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda but CUDA is not available; pass --device cpu")
    model, tokenizer = load_model(args)
    hf_dir = is_hf_dir(args)
    model = model.to(args.device).eval()
    if args.device.startswith("cuda"):
        model = model.half() if not torch.cuda.is_bf16_supported() else model.to(torch.bfloat16)
    if isinstance(model, MiniMindForCausalLM):
        total, active = count_params(model)
        print(f"Model Params: {total:.2f}M" + (f"-A{active:.2f}M" if model.config.use_moe else ""))

    mode = args.mode
    if mode is None:
        if sys.stdin.isatty():
            mode = "chat" if input("[0] 自动测试 auto  [1] 手动输入 chat\n").strip() == "1" else "auto"
        else:
            mode = "auto"
    prompts = iter(args.prompts or AUTO_PROMPTS) if mode == "auto" else None
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    history = []
    while True:
        if prompts is not None:
            prompt = next(prompts, None)
            if prompt is None:
                break
            print(f"👶: {prompt}")
        else:
            try:
                prompt = input("👶: ").strip()
            except EOFError:
                break
            if not prompt:
                break
        setup_seed(args.seed if args.seed is not None else random.randint(0, 2**31 - 1))
        history = history[-args.historys:] if args.historys else []
        history.append({"role": "user", "content": prompt})
        if args.weight == "pretrain" and not hf_dir:
            text = tokenizer.bos_token + prompt
        else:
            kw = {"enable_thinking": True} if "reason" in args.weight else {}
            text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True, **kw)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(args.device)
        print("🤖: ", end="", flush=True)
        t0 = time.time()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=True,
                                 temperature=args.temperature, top_p=args.top_p, streamer=streamer,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = out[0, inputs["input_ids"].shape[1]:]
        reply = tokenizer.decode(new, skip_special_tokens=True)
        print(f"[{len(new)} tokens, {len(new) / max(time.time() - t0, 1e-9):.1f} tok/s]\n")
        history.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    run_main(main)
