"""DPO (Rafailov et al. 2023): prefer the chosen answer over the rejected one, relative to a frozen reference model.

    cd trainer && torchrun --nproc_per_node 2 train_dpo.py --hidden_size 640 --num_hidden_layers 12 --use_moe 1 \
        --headwise_attn_output_gate 1 --use_wandb
    python trainer/train_dpo.py --data_path dataset/demo/dpo.jsonl --hidden_size 64 --num_hidden_layers 2

Data: JSONL lines {"chosen": [messages], "rejected": [messages]} (MiniMind's dpo.jsonl): the same prompt with a
preferred and a dispreferred assistant answer; only the assistant tokens count. The policy and the reference both
start from out/full_sft_*.pth; writes out/dpo_{hidden}{_moe}.pth. Per pair, with log-probs s of the answer tokens,

    loss = -log sigmoid(beta * [(s_pol(chosen) - s_ref(chosen)) - (s_pol(rejected) - s_ref(rejected))])

--loss_type sigmoid_norm (default, MiniMind's): s is the mean log-prob per answer token (length-normalised);
--loss_type sigmoid: s is the summed log-prob (the paper's and TRL's DPO). A pair whose chosen or rejected answer has
no supervised token (e.g. truncated away by --max_seq_len) adds nothing to the loss and is counted in `empty_pairs`.
Logged: dpo_loss, aux_loss (MoE), reward_accuracy, reward_margin, chosen/rejected_reward (beta * policy-ref log-ratio)
and chosen/rejected_logp (policy).
"""
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset.lm_dataset import DPODataset, collate_dpo, collate_dpo_packed
from model.flops import forward_flops, training_flops
from model.model_stats import ModelStats
from trainer.rl_utils import frozen_copy, selected_logprobs
from trainer.trainer_utils import (HeldOutEval, TrainLoop, add_heldout_flags, build_optimizer, build_parser,
                                   check_max_seq_len, dataset_options, init_model, init_run, model_config_from_args,
                                   parse_args, run_main)


def token_logps(logits, labels):
    """log p(label_t | prefix) of the next-token labels in fp32: [N, T] log-probs (0 where unsupervised), 0/1 mask.

    selected_logprobs takes the label logit minus a logsumexp in fp32 row chunks and recomputes the softmax in
    backward, so no full-vocabulary log_softmax (nor an fp32 copy of bf16 logits) is kept alive. The labels are
    shifted rather than the logits sliced, so the logits stay contiguous and are not copied.
    """
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
    mask = targets != -100
    logps = selected_logprobs(logits, targets.clamp(min=0)) * mask
    return logps, mask


def sequence_logps(logits, labels, sample_index, n_seq: int, normalize: bool):
    """Per-sequence log-prob of the supervised tokens (summed, or their mean when normalize) and token counts [n_seq].

    Rows are not sequences in a packed batch: every token's log-prob is added to its sequence's sum by sample_index
    (the collates' "sample_index", -1 on pads). The target at t is the label at t+1, so it belongs to the sequence of
    position t+1 (within a segment the same one; a segment's first label is -100 and never a target).
    """
    logps, mask = token_logps(logits, labels)
    owner = torch.cat([sample_index[:, 1:], sample_index.new_full((sample_index.shape[0], 1), -1)], dim=1)
    owner = torch.where(mask, owner, n_seq).flatten()  # unsupervised positions land in a spare slot n_seq
    total = logps.new_zeros(n_seq + 1).index_add_(0, owner, logps.flatten())[:n_seq]
    n_tokens = mask.new_zeros(n_seq + 1, dtype=torch.long).index_add_(0, owner, mask.flatten().long())[:n_seq]
    return (total / n_tokens.clamp(min=1) if normalize else total), n_tokens


def dpo_loss(policy_logps, ref_logps, beta: float, n_tokens=None):
    """DPO loss over pairs laid out as the DPO collates number them: sequences 0..B-1 chosen, B..2B-1 rejected.

    policy_logps, ref_logps: [2B] per-sequence log-probs; n_tokens: [2B] supervised tokens per sequence (optional).
    Returns (loss, metrics). Pairs with an empty chosen or rejected span are left out of the loss and the reward
    metrics (mean over the valid pairs; 0 if none) and counted in metrics["empty_pairs"].
    """
    b = policy_logps.shape[0] // 2
    pol_c, pol_r = policy_logps[:b], policy_logps[b:]
    ref_c, ref_r = ref_logps[:b].detach(), ref_logps[b:].detach()
    if n_tokens is None:
        valid = torch.ones(b, dtype=torch.bool, device=policy_logps.device)
    else:
        valid = (n_tokens[:b] > 0) & (n_tokens[b:] > 0)
    w = valid.to(policy_logps.dtype)
    n_valid = w.sum().clamp(min=1)
    chosen_reward = beta * (pol_c - ref_c)
    rejected_reward = beta * (pol_r - ref_r)
    margin = chosen_reward - rejected_reward
    # where() instead of a product: an empty pair must add exactly 0, even if its logit were inf/nan
    per_pair = torch.where(valid, -F.logsigmoid(margin), torch.zeros_like(margin))
    loss = per_pair.sum() / n_valid

    def mean(x):
        return (torch.where(valid, x.detach(), torch.zeros_like(x)).sum() / n_valid)

    metrics = dict(reward_accuracy=mean((margin > 0).to(w.dtype)), reward_margin=mean(margin),
                   chosen_reward=mean(chosen_reward), rejected_reward=mean(rejected_reward),
                   chosen_logp=mean(pol_c), rejected_logp=mean(pol_r), empty_pairs=(~valid).sum())
    return loss, metrics


def valid_pairs(batch) -> int:
    """Loss units of a DPO batch (counted on the CPU batch): pairs whose chosen and rejected answers both keep at
    least one supervised token. The loss is a mean over them, so the loop weights micro-batches by this count.
    Counted per sequence ("supervised" [2B]), since a packed row may hold several."""
    n = batch["supervised"]
    b = n.shape[0] // 2
    return int(((n[:b] > 0) & (n[b:] > 0)).sum())


def heldout_dpo(args, ctx, model, ref_model, observer=ModelStats) -> HeldOutEval:
    """Held-out preference pairs: eval_reward_accuracy (share of valid pairs whose chosen answer gets the larger
    implicit reward), eval_reward_margin (mean chosen - rejected reward) and eval_dpo_loss, means over valid pairs."""
    normalize = args.loss_type == "sigmoid_norm"

    def score(m, b):
        ids, labels, mask, index = b["input_ids"], b["labels"], b["attention_mask"], b["sample_index"]
        n_seq = b["supervised"].shape[0]
        policy, n_tokens = sequence_logps(m(ids, attention_mask=mask).logits, labels, index, n_seq, normalize)
        ref, _ = sequence_logps(ref_model(ids, attention_mask=mask).logits, labels, index, n_seq, normalize)
        loss, mt = dpo_loss(policy, ref, args.beta, n_tokens)
        n = n_seq // 2 - mt["empty_pairs"]  # the metrics are means over the valid pairs: back to sums
        return {"pairs": n, "correct": mt["reward_accuracy"] * n, "margin": mt["reward_margin"] * n,
                "loss": loss * n}

    def summarize(s):
        if not s["pairs"]:
            return {}
        return {"eval_reward_accuracy": s["correct"] / s["pairs"], "eval_reward_margin": s["margin"] / s["pairs"],
                "eval_dpo_loss": s["loss"] / s["pairs"]}

    return HeldOutEval(args, ctx, model, score=score, keys=("pairs", "correct", "margin", "loss"),
                       summarize=summarize, collate_fn=collate_dpo, observer=observer)


def main():
    parser = build_parser("MiniMind DPO", save_weight="dpo", epochs=1, batch_size=4, learning_rate=4e-8,
                          accumulation_steps=1, log_interval=100, save_interval=100, max_seq_len=1024,
                          data_path="dataset/dpo.jsonl", from_weight="full_sft", wandb_project="MiniMind-DPO")
    parser.add_argument("--beta", type=float, default=0.1,
                        help="DPO beta: strength of the pull towards the reference (Rafailov et al. 2023; 0.1-0.5)")
    parser.add_argument("--loss_type", type=str, default="sigmoid_norm", choices=["sigmoid_norm", "sigmoid"],
                        help="sigmoid_norm = per-token mean log-prob (MiniMind); sigmoid = summed log-prob (paper/TRL)")
    add_heldout_flags(parser, eval_samples=200, what="eval_reward_accuracy, eval_reward_margin, eval_dpo_loss")
    args = parse_args(parser)
    ctx = init_run(args)

    # ---------------------------------------------------------------- policy, frozen reference, data
    config = model_config_from_args(args)
    model, tokenizer = init_model(config, args.from_weight, args.tokenizer_path, args.save_dir, ctx.device)
    # the reference never changes, so it is neither DDP-wrapped nor part of the resume file (it is full_sft again);
    # frozen_copy broadcasts rank 0's weights, so it equals the DDP policy on every rank also with --from_weight none
    ref_model = frozen_copy(model)
    check_max_seq_len(args.max_seq_len, tokenizer)
    dataset = DPODataset(args.data_path, tokenizer, max_length=args.max_seq_len, **dataset_options(DPODataset, args))
    # --pack 1: the 2B chosen/rejected sequences share rows of <= max_seq_len, each attending to itself only
    collate = partial(collate_dpo_packed, max_len=args.max_seq_len) if args.pack else collate_dpo
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, ctx.device, args.optimizer)
    loop = TrainLoop(args, ctx, model=model, optimizer=optimizer, dataset=dataset, collate_fn=collate,
                     config=config, stage="DPO", tokenizer=tokenizer, count_units=valid_pairs,
                     evaluate=heldout_dpo(args, ctx, model, ref_model),
                     flops=training_flops(config) + forward_flops(config),  # the policy trains, the reference runs
                     run_name=f"MiniMind-DPO-Epoch-{args.epochs}-BS-{args.batch_size}-LR-{args.learning_rate}")
    normalize = args.loss_type == "sigmoid_norm"

    # ---------------------------------------------------------------- train: chosen and rejected in one forward
    for batch in loop:
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        pos = batch.get("position_ids")  # packed rows: positions restart per sequence
        index, n_seq = batch["sample_index"], batch["supervised"].shape[0]  # which of the 2B sequences a token is in
        # same autocast for both models, so policy and reference log-probs are computed in the same precision
        with ctx.autocast():
            with torch.no_grad():
                ref_logits = ref_model(ids, attention_mask=mask, position_ids=pos).logits
                ref_logps, _ = sequence_logps(ref_logits, labels, index, n_seq, normalize)
                del ref_logits
            out = loop.model(ids, attention_mask=mask, position_ids=pos)
            policy_logps, n_tokens = sequence_logps(out.logits, labels, index, n_seq, normalize)
            loss_dpo, metrics = dpo_loss(policy_logps, ref_logps, args.beta, n_tokens)
        # loss_dpo is the mean over this micro-batch's valid pairs; the loop weights it by their number
        loop.backward(loss_dpo, units=loop.units, aux=out.aux_loss, dpo_loss=loss_dpo, **metrics)
    loop.finish()


if __name__ == "__main__":
    run_main(main)
