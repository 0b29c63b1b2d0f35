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
import glob
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import TextStreamer  # noqa: E402

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, count_params  # noqa: E402
from trainer.trainer_utils import (ARCH_FLAGS, UserError, load_tokenizer, load_weights, read_sidecar,  # noqa: E402
                                   root_path, run_main, setup_seed, weight_path)

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


def find_weight(args) -> tuple[str, dict | None]:
    """The weight file for --weight, and its sidecar. Sizes not given on the command line come from the sidecar."""
    if args.hidden_size is not None:
        path = weight_path(args.save_dir, args.weight, args.hidden_size, bool(args.use_moe))
        return path, read_sidecar(path)
    found = sorted(p for p in glob.glob(os.path.join(args.save_dir, f"{args.weight}_*.pth"))
                   if Path(p).stem[len(args.weight) + 1:].split("_")[0].isdigit())
    if args.use_moe is not None:
        found = [p for p in found if p.endswith("_moe.pth") == bool(args.use_moe)]
    if not found:
        raise UserError(f"no {args.save_dir}/{args.weight}_*.pth found; train that stage first or pass --save_dir")
    if len(found) > 1:
        raise UserError(f"several weights match --weight {args.weight}: {', '.join(found)}; "
                        "pick one with --hidden_size (and --use_moe)")
    return found[0], read_sidecar(found[0])


def build_native_model(args):
    path, side = find_weight(args)
    file_cfg = (side or {}).get("model_config") or {}
    cfg = {"hidden_size": 512, "num_hidden_layers": 8, "use_moe": False, "headwise_attn_output_gate": True}
    cfg.update({k: file_cfg[k] for k in cfg if k in file_cfg})
    for key, flag in ARCH_FLAGS.items():
        given = getattr(args, key)
        if given is None:
            continue
        if file_cfg and key in file_cfg and file_cfg[key] != type(file_cfg[key])(given):
            raise UserError(f"{flag} {given} contradicts {path} (trained with {key}={file_cfg[key]}); "
                            f"drop the flag or pass {flag} {int(file_cfg[key]) if isinstance(file_cfg[key], bool) else file_cfg[key]}")
        cfg[key] = type(cfg[key])(given)
    extra = {k: file_cfg[k] for k in ("num_attention_heads", "num_key_value_heads", "vocab_size",
                                      "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
                                      "intermediate_size", "rope_theta") if k in file_cfg}
    config = MiniMindConfig(**cfg, **extra, inference_rope_scaling=args.inference_rope_scaling)
    model = MiniMindForCausalLM(config)
    load_weights(model, path, config)
    if args.lora_weight:
        from model.model_lora import apply_lora_from_file, merge_lora
        apply_lora_from_file(model, weight_path(os.path.join(args.save_dir, "lora"), args.lora_weight,
                                                config.hidden_size, config.use_moe))
        model = merge_lora(model)  # folded into the base in fp32: generation then costs what the base costs
    tok_dir = args.tokenizer_path or (side or {}).get("tokenizer_path") or root_path("model")
    if not os.path.isdir(tok_dir):
        tok_dir = root_path("model")
    print(f"loaded {path}" + (f" + LoRA {args.lora_weight}" if args.lora_weight else ""))
    return model, load_tokenizer(tok_dir)


def build_hf_model(args):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(args.load_from, trust_remote_code=True)
    return model, load_tokenizer(args.load_from)


def main():
    p = argparse.ArgumentParser(description="Chat with a MiniMind checkpoint",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--load_from", type=str, default="model",
                   help="'model' = native .pth weights from --save_dir; or a transformers-format model directory")
    p.add_argument("--save_dir", type=str, default="out", help="目录 / where {weight}_{hidden}.pth lives")
    p.add_argument("--weight", type=str, default="full_sft", help="权重名 / weight name (pretrain, full_sft, dpo...)")
    p.add_argument("--lora_weight", type=str, default=None,
                   help="LoRA 名 / out/lora/{name}_{hidden}{_moe}.pth (rank, alpha, targets from its .json)")
    p.add_argument("--tokenizer_path", type=str, default=None, help="tokenizer dir (default: the sidecar's, or model/)")
    p.add_argument("--hidden_size", type=int, default=None, help="default: from the sidecar")
    p.add_argument("--num_hidden_layers", type=int, default=None, help="default: from the sidecar")
    p.add_argument("--use_moe", type=int, default=None, choices=[0, 1], help="default: from the sidecar")
    p.add_argument("--headwise_attn_output_gate", type=int, default=None, choices=[0, 1],
                   help="default: from the sidecar (1 without one)")
    p.add_argument("--inference_rope_scaling", action="store_true", help="YaRN x16 context extension (2048 -> 32k)")
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
    args.save_dir = root_path(args.save_dir) if args.save_dir == "out" else str(Path(args.save_dir).resolve())

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda but CUDA is not available; pass --device cpu")
    hf_dir = args.load_from != "model" and os.path.exists(os.path.join(args.load_from, "config.json"))
    model, tokenizer = build_hf_model(args) if hf_dir else build_native_model(args)
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
