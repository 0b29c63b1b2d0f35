"""The flags every stage shares: defaults, help text, path resolution."""
from __future__ import annotations

import argparse

import torch

from trainer.spine.common import root_path, str2bool_int, user_path

# Default values of the common flags. Stage scripts override what differs (reference §1.0).
COMMON_DEFAULTS = dict(
    save_dir="out", save_weight="pretrain", epochs=1, batch_size=32, learning_rate=5e-4, accumulation_steps=1,
    grad_clip=1.0, log_interval=100, save_interval=1000, hidden_size=512, num_hidden_layers=8, max_seq_len=340,
    data_path="dataset/pretrain_hq.jsonl", from_weight="none", wandb_project="MiniMind-Pretrain",
)
# Flags that hold paths: given defaults resolve against the repo root, user values against the cwd.
PATH_FLAGS = ("save_dir", "data_path", "tokenizer_path", "checkpoint_dir")


def build_parser(description: str, skip: tuple[str, ...] = (), **defaults) -> argparse.ArgumentParser:
    """The flags every stage shares, with the stage's defaults. `skip` drops flags a stage does not have."""
    d = {**COMMON_DEFAULTS, **defaults}
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def add(name, **kw):
        if name not in skip:
            p.add_argument(f"--{name}", **kw)

    add("save_dir", type=str, default=d["save_dir"], help="权重输出目录 / where {weight}_{hidden}.pth is written")
    add("save_weight", type=str, default=d["save_weight"], help="输出权重名前缀 / output weight name prefix")
    add("epochs", type=int, default=d["epochs"], help="训练轮数 / epochs")
    add("batch_size", type=int, default=d["batch_size"], help="每卡 batch / per-device micro-batch size")
    add("learning_rate", type=float, default=d["learning_rate"], help="峰值学习率 / peak learning rate (cosine to 0.1x)")
    add("device", type=str, default="cuda:0" if torch.cuda.is_available() else "cpu",
        help="训练设备 / device (under torchrun each rank uses cuda:LOCAL_RANK)")
    add("dtype", type=str, default=None, choices=["bfloat16", "float16", "float32"],
        help="混合精度 / autocast dtype; default bfloat16 on CUDA (float16 if bf16 unsupported), float32 on CPU")
    add("num_workers", type=int, default=8, help="数据加载进程数 / DataLoader workers")
    add("accumulation_steps", type=int, default=d["accumulation_steps"], help="梯度累积步数 / gradient accumulation")
    add("grad_clip", type=float, default=d["grad_clip"], help="梯度裁剪阈值 / max grad norm (0 = off)")
    add("log_interval", type=int, default=d["log_interval"], help="日志间隔(步) / log every N micro-steps")
    add("save_interval", type=int, default=d["save_interval"], help="保存间隔(步) / save every N micro-steps")
    add("hidden_size", type=int, default=d["hidden_size"], help="隐藏层维度 / hidden size")
    add("num_hidden_layers", type=int, default=d["num_hidden_layers"], help="层数 / number of layers")
    add("max_seq_len", type=int, default=d["max_seq_len"], help="最大序列长度 / max tokens per sample")
    add("use_moe", type=str2bool_int, default=0, choices=[0, 1], help="是否使用 MoE / mixture of experts FFN")
    add("headwise_attn_output_gate", type=str2bool_int, default=1, choices=[0, 1],
        help="注意力头输出门控 (Qiu et al. 2025); 加载未启用门控训练的旧权重时传 0 / pass 0 for old MiniMind weights")
    add("data_path", type=str, default=d["data_path"], help="训练数据 jsonl / training data")
    add("from_weight", type=str, default=d["from_weight"], help="初始化权重名, none=随机 / init weight name or none")
    add("from_resume", type=str2bool_int, default=0, choices=[0, 1], help="断点续训 / resume from checkpoint_dir")
    add("use_wandb", action="store_true", help="使用 wandb 记录 / log to wandb (WANDB_MODE=offline works)")
    add("wandb_project", type=str, default=d["wandb_project"], help="wandb project")
    add("tokenizer_path", type=str, default="model", help="tokenizer 目录 / any HF tokenizer directory")
    add("checkpoint_dir", type=str, default="checkpoints", help="续训文件目录 / where *_resume.pth is written")
    add("max_steps", type=int, default=0, help="最多训练多少步后停止并保存 (0=不限) / stop after N micro-steps")
    add("seed", type=int, default=42, help="随机种子 / seed (data order uses seed+epoch)")
    add("weight_decay", type=float, default=0.01, help="AdamW weight decay (matrices only, not norms/embeddings)")
    add("warmup_iters", type=int, default=0, help="线性预热步数 / linear LR warmup (optimizer steps)")
    add("use_compile", type=str2bool_int, default=0, choices=[0, 1], help="torch.compile 模型 / compile the model")
    return p


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse and resolve paths: defaults against the repo root, user-given values against the cwd."""
    args = parser.parse_args(argv)
    for name in PATH_FLAGS + tuple(getattr(parser, "extra_path_flags", ())):
        if not hasattr(args, name) or getattr(args, name) is None:
            continue
        given = getattr(args, name)
        if given == parser.get_default(name):
            setattr(args, name, root_path(given))
        else:
            setattr(args, name, user_path(given))
    return args
