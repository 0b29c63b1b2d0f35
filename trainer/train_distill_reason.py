"""Reasoning distillation: SFT on R1-style traces with extra loss weight on the think/answer tags.

    cd trainer && torchrun --nproc_per_node 2 train_distill_reason.py --hidden_size 640 --num_hidden_layers 12 \
        --use_moe 1 --headwise_attn_output_gate 1 --use_wandb
    python trainer/train_distill_reason.py --data_path dataset/demo/reason.jsonl --hidden_size 64 \
        --num_hidden_layers 2 --from_weight full_sft

Data: SFT JSONL ({"conversations": [...]}) whose assistant answers read "<think>\\n...\\n</think>\\n<answer>\\n...
\\n</answer>" (MiniMind's r1_mix_1024.jsonl). Starts from out/dpo_*.pth, writes out/reason_{hidden}{_moe}.pth.

Loss, over the supervised (assistant) positions S of the batch, with per-token cross-entropy CE_t:

    loss = sum_{t in S} w_t * CE_t / sum_{t in S} w_t   (+ MoE aux loss)
    w_t = --tag_weight on every token of an occurrence of <think>, </think>, <answer> or </answer>, 1 elsewhere

The normaliser is the weighted count, so the loss stays a weighted mean of per-token CE (tag_weight 1 gives plain
SFT) and its scale does not grow with the number of tags. A tag is found as its whole token-id sequence (the
tokenizer's encoding of the tag alone) inside the labels, so it works when the tags are single tokens (the shipped
tokenizer) and when they split into sub-words; a lone '<' or 'think' elsewhere is never weighted, and tags in the
system/user prompt are never weighted because those labels are -100. A tokenizer that merges a tag with its
neighbours (e.g. ' <' as one token) hides that occurrence: the logged `tag_tokens` fraction shows whether tags were
found.
"""
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from dataset.lm_dataset import SFTDataset, collate_lm, collate_packed
from model.chat_format import REASONING_TAGS
from model.flops import training_flops
from trainer.trainer_utils import (Logger, TrainLoop, UserError, add_heldout_flags, build_optimizer, build_parser,
                                   check_max_seq_len, dataset_options, init_model, init_run, lm_heldout,
                                   model_config_from_args, parse_args, run_main)

TAGS = REASONING_TAGS


def tag_id_sequences(tokenizer, tags=TAGS) -> list[list[int]]:
    """Each tag's token ids as the tokenizer writes it on its own (one id for the shipped tokenizer)."""
    return [tokenizer(tag, add_special_tokens=False)["input_ids"] for tag in tags]


def tag_positions(labels: torch.Tensor, tag_id_seqs: list[list[int]]) -> torch.Tensor:
    """Bool [B, T]: True on every token of each complete occurrence of a tag's id sequence in `labels` [B, T].

    -100 (not supervised) matches no token id, so an occurrence lies wholly inside the supervised span: tags in the
    system/user prompt are never found. Sequences are matched whole, never as a set of sub-word ids.
    """
    is_tag = torch.zeros_like(labels, dtype=torch.bool)
    T = labels.shape[1]
    for seq in tag_id_seqs:
        n = len(seq)
        if n == 0 or n > T:
            continue
        target = torch.tensor(seq, dtype=labels.dtype, device=labels.device)
        starts = (labels.unfold(1, n, 1) == target).all(dim=-1)  # [B, T-n+1]: an occurrence starts here
        for k in range(n):  # mark every token the occurrence covers
            is_tag[:, k:k + starts.shape[1]] |= starts
    return is_tag


def tag_weights(labels: torch.Tensor, tag_id_seqs: list[list[int]], weight: float) -> torch.Tensor:
    """Per-position loss weights for `labels` [B, T]: 0 where the label is -100, `weight` on tag tokens
    (tag_positions), 1 on the other supervised tokens."""
    return (labels != -100).float().masked_fill(tag_positions(labels, tag_id_seqs), float(weight))


def tag_weighted_ce(logits: torch.Tensor, labels: torch.Tensor, tag_id_seqs: list[list[int]], weight: float):
    """(loss, ce, tag_fraction) for logits [B, T, V] and unshifted labels [B, T].

    loss = sum w_t CE_t / sum w_t over supervised positions (w from tag_weights), ce = the unweighted mean
    (comparable with full_sft's loss), tag_fraction = share of supervised tokens that are tag tokens. All three
    are 0 for a batch without supervised tokens (not NaN). CE is computed in fp32.
    """
    targets = labels[:, 1:]  # the logits at t predict the label at t+1
    w = tag_weights(targets, tag_id_seqs, weight)
    flat = logits[:, :-1].float()
    ce = F.cross_entropy(flat.reshape(-1, flat.shape[-1]), targets.reshape(-1), ignore_index=-100,
                         reduction="none").view_as(targets)  # 0 where not supervised
    n_sup = (targets != -100).sum().clamp(min=1)
    loss = (w * ce).sum() / w.sum().clamp(min=1e-8)  # all-zero weights: 0 / eps = 0
    return loss, ce.sum() / n_sup, tag_positions(targets, tag_id_seqs).sum() / n_sup


def main():
    parser = build_parser("MiniMind Reasoning Distillation (SFT on think/answer traces)", save_weight="reason",
                          epochs=1, batch_size=8, learning_rate=1e-6, accumulation_steps=1, log_interval=100,
                          save_interval=100, max_seq_len=720, data_path="dataset/r1_mix_1024.jsonl",
                          from_weight="dpo", wandb_project="MiniMind-Reasoning")
    parser.add_argument("--tag_weight", type=float, default=10.0,
                        help="<think>/</think>/<answer>/</answer> 标签 token 的损失权重 (1 = 普通 SFT) / "
                             "loss weight of the tag tokens in the answer (1 = plain SFT)")
    add_heldout_flags(parser, what="eval_loss, eval_bpb: plain CE, tags not weighted")
    args = parse_args(parser)
    if args.tag_weight < 0:
        raise UserError(f"--tag_weight must be >= 0 (got {args.tag_weight}); 1 = plain SFT, 10 = the reference")
    ctx = init_run(args)

    # ---------------------------------------------------------------- model and data
    config = model_config_from_args(args)
    model, tokenizer = init_model(config, args.from_weight, args.tokenizer_path, args.save_dir, ctx.device)
    tag_seqs = tag_id_sequences(tokenizer)
    Logger("tag token ids: " + ", ".join(f"{t} -> {s}" for t, s in zip(TAGS, tag_seqs))
           + f" | weight {args.tag_weight:g}")
    check_max_seq_len(args.max_seq_len, tokenizer)
    dataset = SFTDataset(args.data_path, tokenizer, max_length=args.max_seq_len, **dataset_options(SFTDataset, args))
    # --pack 1: whole conversations share rows of <= max_seq_len, each attending to itself only
    collate = partial(collate_packed, max_len=args.max_seq_len) if args.pack else collate_lm
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, ctx.device, args.optimizer)
    # the loss is a weighted mean over supervised tokens: its units are the summed weights (see tag_weighted_ce)
    loop = TrainLoop(args, ctx, model=model, optimizer=optimizer, dataset=dataset, collate_fn=collate,
                     config=config, stage="Distill-Reasoning", tokenizer=tokenizer,
                     count_units=lambda b: float(tag_weights(b["labels"][:, 1:], tag_seqs, args.tag_weight).sum()),
                     evaluate=lm_heldout(args, ctx, model, tokenizer), flops=training_flops(config))

    # ---------------------------------------------------------------- train
    for batch in loop:
        with ctx.autocast():
            out = loop.model(batch["input_ids"], attention_mask=batch["attention_mask"],
                             position_ids=batch.get("position_ids"))
        logits_loss, ce, tag_frac = tag_weighted_ce(out.logits, batch["labels"], tag_seqs, args.tag_weight)
        loop.backward(logits_loss, units=loop.units, aux=out.aux_loss, logits_loss=logits_loss, ce_loss=ce,
                      tag_tokens=tag_frac)
    loop.finish()


if __name__ == "__main__":
    run_main(main)
