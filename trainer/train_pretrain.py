"""Pretraining: next-token prediction on raw text (plus the MoE load-balancing loss).

    cd trainer && torchrun --nproc_per_node 2 train_pretrain.py --hidden_size 640 --num_hidden_layers 12 \
        --use_moe 1 --headwise_attn_output_gate 1 --use_wandb
    python trainer/train_pretrain.py --data_path dataset/demo/pretrain.jsonl --hidden_size 64 --num_hidden_layers 2

Data: JSONL lines {"text": "..."} (MiniMind's pretrain_hq.jsonl). Writes out/pretrain_{hidden}{_moe}.pth (+ .json
sidecar) and checkpoints/pretrain_{hidden}{_moe}_resume.pth.
"""
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset.lm_dataset import PretrainDataset, collate_lm, collate_pretrain_packed
from trainer.trainer_utils import (TrainLoop, build_optimizer, build_parser, dataset_options, init_model, init_run,
                                   model_config_from_args, parse_args, run_main)


def main():
    parser = build_parser("MiniMind Pretraining", save_weight="pretrain", epochs=1, batch_size=32,
                          learning_rate=5e-4, accumulation_steps=8, log_interval=100, save_interval=1000,
                          max_seq_len=340, data_path="dataset/pretrain_hq.jsonl", from_weight="none",
                          wandb_project="MiniMind-Pretrain", group_by_length=0)
    args = parse_args(parser)
    ctx = init_run(args)

    # ---------------------------------------------------------------- model and data
    config = model_config_from_args(args)
    model, tokenizer = init_model(config, args.from_weight, args.tokenizer_path, args.save_dir, ctx.device)
    dataset = PretrainDataset(args.data_path, tokenizer, max_length=args.max_seq_len,
                              **dataset_options(PretrainDataset, args))
    # --pack 1: documents fill rows of exactly max_seq_len (one may continue in the next row), see the docstring
    collate = partial(collate_pretrain_packed, max_len=args.max_seq_len) if args.pack else collate_lm
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, ctx.device)
    loop = TrainLoop(args, ctx, model=model, optimizer=optimizer, dataset=dataset, collate_fn=collate,
                     config=config, stage="Pretrain", tokenizer=tokenizer)

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
