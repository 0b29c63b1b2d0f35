"""Full supervised fine-tuning: cross-entropy on assistant tokens only (plus the MoE load-balancing loss).

    cd trainer && torchrun --nproc_per_node 2 train_full_sft.py --hidden_size 640 --num_hidden_layers 12 \
        --use_moe 1 --headwise_attn_output_gate 1 --data_path ../dataset/sft_512.jsonl --use_wandb
    python trainer/train_full_sft.py --data_path dataset/demo/sft.jsonl --hidden_size 64 --num_hidden_layers 2

Data: JSONL lines {"conversations": [{"role": "system|user|assistant|tool", "content": "..."}, ...]} (MiniMind's
sft_*.jsonl); the loss covers each assistant turn's content and its <|im_end|>. Starts from out/pretrain_*.pth and
writes out/full_sft_{hidden}{_moe}.pth (+ .json) and checkpoints/full_sft_{hidden}{_moe}_resume.pth.
"""
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset.lm_dataset import SFTDataset, collate_lm, collate_packed
from model.flops import training_flops
from trainer.trainer_utils import (TrainLoop, add_heldout_flags, build_optimizer, build_parser, check_max_seq_len,
                                   dataset_options, init_model, init_run, lm_heldout, model_config_from_args,
                                   parse_args, run_main)


def main():
    parser = build_parser("MiniMind Full SFT", save_weight="full_sft", epochs=2, batch_size=16,
                          learning_rate=1e-6, accumulation_steps=1, log_interval=100, save_interval=1000,
                          max_seq_len=340, data_path="dataset/sft_mini_512.jsonl", from_weight="pretrain",
                          wandb_project="MiniMind-Full-SFT")
    add_heldout_flags(parser)
    args = parse_args(parser)
    ctx = init_run(args)

    # ---------------------------------------------------------------- model and data
    config = model_config_from_args(args)
    model, tokenizer = init_model(config, args.from_weight, args.tokenizer_path, args.save_dir, ctx.device)
    check_max_seq_len(args.max_seq_len, tokenizer)
    dataset = SFTDataset(args.data_path, tokenizer, max_length=args.max_seq_len, **dataset_options(SFTDataset, args))
    # --pack 1: whole conversations share rows of <= max_seq_len, each attending to itself only
    collate = partial(collate_packed, max_len=args.max_seq_len) if args.pack else collate_lm
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, ctx.device, args.optimizer)
    loop = TrainLoop(args, ctx, model=model, optimizer=optimizer, dataset=dataset, collate_fn=collate,
                     config=config, stage="Full-SFT", tokenizer=tokenizer,
                     evaluate=lm_heldout(args, ctx, model, tokenizer), flops=training_flops(config))

    # ---------------------------------------------------------------- train
    for batch in loop:
        with ctx.autocast():
            out = loop.model(batch["input_ids"], attention_mask=batch["attention_mask"],
                             position_ids=batch.get("position_ids"), labels=batch["labels"])
        # out.loss is the mean over this micro-batch's supervised tokens; the loop re-weights it by their number
        loop.backward(out.loss, units=loop.units, aux=out.aux_loss, logits_loss=out.loss)
    loop.finish()


if __name__ == "__main__":
    run_main(main)
