"""What every program that chats with a checkpoint shares: picking and loading the model by --weight.

    from trainer.chat_utils import add_model_args, load_model
    add_model_args(parser)                 # --load_from --save_dir --weight --lora_weight --tokenizer_path sizes...
    model, tokenizer = load_model(args)    # native .pth (+ sidecar, + LoRA merged) or a transformers folder

Used by eval_llm.py and the scripts/ tools (server, web page, benchmarks), so they select models the same way.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer.trainer_utils import (ARCH_FLAGS, UserError, load_tokenizer, load_weights, read_sidecar, root_path,
                                   weight_path)


def add_model_args(p) -> None:
    """The model-selection flags of eval_llm.py, the server and the benchmarks."""
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


def resolve_model_paths(args) -> None:
    """--save_dir's default resolves against the repo root, a typed path against the current directory."""
    args.save_dir = root_path(args.save_dir) if args.save_dir == "out" else str(Path(args.save_dir).resolve())


def is_hf_dir(args) -> bool:
    return args.load_from != "model" and os.path.exists(os.path.join(args.load_from, "config.json"))


def load_model(args):
    """(model, tokenizer) on the CPU in fp32, eval mode not set: a transformers folder (--load_from DIR) or native
    weights chosen by --weight/--save_dir (sizes from the sidecar), with --lora_weight merged in."""
    resolve_model_paths(args)
    return build_hf_model(args) if is_hf_dir(args) else build_native_model(args)


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
            value = int(file_cfg[key]) if isinstance(file_cfg[key], bool) else file_cfg[key]
            raise UserError(f"{flag} {given} contradicts {path} (trained with {key}={file_cfg[key]}); "
                            f"drop the flag or pass {flag} {value}")
        cfg[key] = type(cfg[key])(given)
    extra = {k: file_cfg[k] for k in ("num_attention_heads", "num_key_value_heads", "vocab_size",
                                      "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
                                      "intermediate_size", "rope_theta", "rms_norm_eps", "max_position_embeddings",
                                      "norm_topk_prob") if k in file_cfg}
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


