"""White-box knowledge distillation: a student learns from the labels and from a frozen teacher's distribution.

    cd trainer && torchrun --nproc_per_node 2 train_distillation.py --student_hidden_size 640 \
        --student_num_layers 12 --teacher_hidden_size 640 --teacher_num_layers 12 --use_moe 1 \
        --headwise_attn_output_gate 1 --use_wandb
    python trainer/train_distillation.py --data_path dataset/demo/sft.jsonl --student_hidden_size 64 \
        --student_num_layers 2 --teacher_hidden_size 96 --teacher_num_layers 3

Student and teacher have their own sizes (--student_* / --teacher_*) and MoE flags (--student_use_moe /
--teacher_use_moe, both defaulting to --use_moe); both start from out/{weight}_{hidden}{_moe}.pth (full_sft by
default). Data: SFT JSONL (MiniMind's sft_mini_512.jsonl). Writes the student to out/full_dist_{hidden}{_moe}.pth.

Loss over the supervised positions S (labels != -100 after the shift), mean over S:

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T))
           + student MoE aux loss (not scaled by alpha)

(Hinton et al. 2015: T^2 keeps the soft-target gradients on the scale of the hard-target ones.) The KL runs over the
vocabulary both models share (the smaller of the two) and in fp32 on the supervised rows only. The teacher is frozen,
not DDP-wrapped, and runs under the same autocast as the student. A missing teacher weight file is an error;
`--from_teacher_weight none` trains the student on plain CE (alpha = 1) on purpose.
"""
import os
import re
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from dataset.lm_dataset import SFTDataset, collate_lm, collate_packed
from model.flops import Flops, forward_flops, training_flops
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, count_params
from trainer.trainer_utils import (Logger, TrainLoop, UserError, add_heldout_flags, build_optimizer, build_parser,
                                   check_max_seq_len, check_model_size, dataset_options, init_model, init_run,
                                   lm_heldout, load_weights, parse_args, run_main, str2bool_int, weight_path)


def distillation_loss(student_logits, teacher_logits, labels, alpha: float, temperature: float):
    """(loss, ce, kd) for logits [B, T, V] and unshifted labels [B, T]; kd = T^2 * KL(p_teacher || p_student).

    Positions whose next label is -100 are ignored; ce and kd are means over the supervised positions (0 when there
    are none). teacher_logits None means no teacher: loss = ce.
    """
    targets = labels[:, 1:]
    keep = targets != -100
    n = keep.sum().clamp(min=1)
    s = student_logits[:, :-1][keep].float()  # [N, Vs]: only supervised rows go to fp32
    ce = F.cross_entropy(s, targets[keep], reduction="sum") / n
    if teacher_logits is None:
        return ce, ce, torch.zeros_like(ce)
    vocab = min(s.shape[-1], teacher_logits.shape[-1])
    t = teacher_logits[:, :-1][keep][:, :vocab].float()
    log_p_s = F.log_softmax(s[:, :vocab] / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum") / n  # sum_v p_t (log p_t - log p_s)
    kd = temperature ** 2 * kl
    return alpha * ce + (1 - alpha) * kd, ce, kd


def _rename_flags(msg: str, names: dict) -> str:
    """Loader messages name the common flags; here the sizes have per-model flags."""
    return re.sub(r"--(\w+)", lambda m: names.get(m.group(1), m.group(0)), msg)


STUDENT_FLAGS = {"hidden_size": "--student_hidden_size", "num_hidden_layers": "--student_num_layers",
                 "use_moe": "--student_use_moe", "from_weight": "--from_student_weight"}
TEACHER_FLAGS = {"hidden_size": "--teacher_hidden_size", "num_hidden_layers": "--teacher_num_layers",
                 "use_moe": "--teacher_use_moe", "headwise_attn_output_gate": "--teacher_headwise_attn_output_gate",
                 "from_weight": "--from_teacher_weight"}


def main():
    parser = build_parser("MiniMind Knowledge Distillation", skip=("hidden_size", "num_hidden_layers", "from_weight"),
                          save_weight="full_dist", epochs=6, batch_size=32, learning_rate=5e-6, accumulation_steps=1,
                          log_interval=100, save_interval=100, max_seq_len=340, data_path="dataset/sft_mini_512.jsonl",
                          wandb_project="MiniMind-Distillation")
    parser.add_argument("--student_hidden_size", type=int, default=512, help="学生隐藏层维度 / student hidden size")
    parser.add_argument("--student_num_layers", type=int, default=8, help="学生层数 / student layers")
    parser.add_argument("--teacher_hidden_size", type=int, default=768, help="教师隐藏层维度 / teacher hidden size")
    parser.add_argument("--teacher_num_layers", type=int, default=16, help="教师层数 / teacher layers")
    parser.add_argument("--student_use_moe", type=str2bool_int, default=None, choices=[0, 1],
                        help="学生 MoE (默认同 --use_moe) / student MoE (default: --use_moe)")
    parser.add_argument("--teacher_use_moe", type=str2bool_int, default=None, choices=[0, 1],
                        help="教师 MoE (默认同 --use_moe) / teacher MoE (default: --use_moe)")
    parser.add_argument("--teacher_headwise_attn_output_gate", type=str2bool_int, default=None, choices=[0, 1],
                        help="教师注意力输出门控 (默认同 --headwise_attn_output_gate) / teacher gate (default: same)")
    parser.add_argument("--from_student_weight", type=str, default="full_sft",
                        help="学生初始化权重名, none=随机 / student init weight name or none")
    parser.add_argument("--from_teacher_weight", type=str, default="full_sft",
                        help="教师权重名, none=不用教师 (纯 CE) / teacher weight name; none = no teacher (plain CE)")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="CE 权重, 1-alpha 给蒸馏项 / weight of the label CE; 1-alpha goes to the KD term")
    parser.add_argument("--temperature", type=float, default=1.5,
                        help="蒸馏温度 (Hinton et al. 2015, 常用 1-4) / softmax temperature of the KD term")
    add_heldout_flags(parser, what="eval_loss, eval_bpb: the student's plain CE on the labels")
    args = parse_args(parser)
    for side in ("student", "teacher"):
        if getattr(args, f"{side}_use_moe") is None:
            setattr(args, f"{side}_use_moe", args.use_moe)
    if args.teacher_headwise_attn_output_gate is None:
        args.teacher_headwise_attn_output_gate = args.headwise_attn_output_gate
    if not 0.0 <= args.alpha <= 1.0 or args.temperature <= 0:
        raise UserError(f"--alpha must be in [0, 1] and --temperature > 0 (got {args.alpha}, {args.temperature})")
    check_model_size(args.student_hidden_size, args.student_num_layers, "--student_hidden_size", "--student_num_layers")
    check_model_size(args.teacher_hidden_size, args.teacher_num_layers, "--teacher_hidden_size", "--teacher_num_layers")
    ctx = init_run(args)

    # ---------------------------------------------------------------- student, teacher and data
    student_config = MiniMindConfig(hidden_size=args.student_hidden_size, num_hidden_layers=args.student_num_layers,
                                    use_moe=bool(args.student_use_moe),
                                    headwise_attn_output_gate=bool(args.headwise_attn_output_gate))
    teacher_config = MiniMindConfig(hidden_size=args.teacher_hidden_size, num_hidden_layers=args.teacher_num_layers,
                                    use_moe=bool(args.teacher_use_moe),
                                    headwise_attn_output_gate=bool(args.teacher_headwise_attn_output_gate))
    try:
        model, tokenizer = init_model(student_config, args.from_student_weight, args.tokenizer_path, args.save_dir,
                                      ctx.device)
    except UserError as e:
        raise UserError("student: " + _rename_flags(str(e), STUDENT_FLAGS)) from None

    teacher = None
    teacher_file = weight_path(args.save_dir, args.from_teacher_weight, teacher_config.hidden_size,
                               teacher_config.use_moe)
    if args.from_teacher_weight != "none":
        if not os.path.exists(teacher_file):
            raise UserError(f"teacher weight file {teacher_file} not found: train the teacher first, or set "
                            "--teacher_hidden_size/--teacher_num_layers/--teacher_use_moe/--from_teacher_weight to "
                            "match an existing file; --from_teacher_weight none trains on plain CE without a teacher")
        teacher = MiniMindForCausalLM(teacher_config)
        try:
            load_weights(teacher, teacher_file, teacher_config)
        except UserError as e:
            raise UserError("teacher: " + _rename_flags(str(e), TEACHER_FLAGS)) from None
        teacher = teacher.to(ctx.device).eval().requires_grad_(False)
        Logger(f"Teacher Params: {count_params(teacher)[0]:.2f}M from {teacher_file} | alpha {args.alpha:g}, "
               f"temperature {args.temperature:g}")
    else:
        Logger("NOTICE: no teacher (--from_teacher_weight none): training the student on plain cross-entropy "
               "(alpha = 1, no KD term)")

    check_max_seq_len(args.max_seq_len, tokenizer)
    dataset = SFTDataset(args.data_path, tokenizer, max_length=args.max_seq_len, **dataset_options(SFTDataset, args))
    # --pack 1: whole conversations share rows of <= max_seq_len, each attending to itself only
    collate = partial(collate_packed, max_len=args.max_seq_len) if args.pack else collate_lm
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, ctx.device, args.optimizer)
    # MFU counts the work done per token: the student's training and the frozen teacher's forward
    flops = training_flops(student_config) + (forward_flops(teacher_config) if teacher is not None else Flops(0, 0))
    loop = TrainLoop(args, ctx, model=model, optimizer=optimizer, dataset=dataset, collate_fn=collate,
                     config=student_config, stage="Distillation", tokenizer=tokenizer,
                     evaluate=lm_heldout(args, ctx, model, tokenizer),
                     flops=flops,
                     run_name=f"MiniMind-Distill-S{args.student_hidden_size}T{args.teacher_hidden_size}-Epoch-"
                              f"{args.epochs}-BatchSize-{args.batch_size}-LearningRate-{args.learning_rate}")

    # ---------------------------------------------------------------- train
    for batch in loop:
        ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch.get("position_ids")
        with ctx.autocast():
            out = loop.model(ids, attention_mask=mask, position_ids=pos)
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(ids, attention_mask=mask, position_ids=pos).logits
            else:
                teacher_logits = None
        loss, ce, kd = distillation_loss(out.logits, teacher_logits, batch["labels"], args.alpha, args.temperature)
        # a mean over the supervised tokens (CE and KD alike): the loop weights it by their number
        loop.backward(loss, units=loop.units, aux=out.aux_loss, ce_loss=ce, distill_loss=kd)
        del teacher_logits
    loop.finish()


if __name__ == "__main__":
    run_main(main)
