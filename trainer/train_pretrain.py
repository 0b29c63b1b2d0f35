"""Pretraining: next-token prediction on raw text (plus the MoE load-balancing loss).

    cd trainer && torchrun --nproc_per_node 2 train_pretrain.py --hidden_size 640 --num_hidden_layers 12 \
        --use_moe 1 --headwise_attn_output_gate 1 --use_wandb
    python trainer/train_pretrain.py --data_path dataset/demo/pretrain.jsonl --hidden_size 64 --num_hidden_layers 2

Data: JSONL lines {"text": "..."} (MiniMind's pretrain_hq.jsonl). Writes out/pretrain_{hidden}{_moe}.pth (+ .json
sidecar) and checkpoints/pretrain_{hidden}{_moe}_resume.pth.

Packing (--pack 1, the default; lm_dataset.collate_pretrain_packed): the micro-batch's documents fill rows of exactly
--max_seq_len, whole documents by best fit first; when none fits the rest of a row, one is split and its tail
continues in a later row, both pieces at least 32 tokens (max_seq_len // 8 when that is smaller). Each piece is a
segment of its own: positions from 0, attention within the piece (the model's segment mask, not GPT-2/nanochat's
attention across documents), so a row of whole documents trains exactly like the documents padded (tested). Only the
micro-batch's last row is partly padding: 96.0% / 97.5% real tokens at batch 16 / 32 and max_seq_len 340 on
pretrain_hq-shaped lengths, against 87.5% padded (python dataset/lm_dataset.py --pack_report), 1.08x the real tokens
per second at 512x8 (python scripts/bench_packing.py speed, CPU bf16). The cost: a split document's later piece is
predicted without its earlier piece (5.7% / 5.3% of the tokens at those settings) and its first token is no target.
On the demo data (python scripts/bench_packing.py loss: 128x4, one epoch, the same seed, data order and optimizer
steps, loss on 500 held-out documents): at --max_seq_len 64, with 2.6-3.0% of the tokens in later pieces, the
held-out loss is +0.0045 to +0.0088 higher than padded (1.5907 vs 1.5833 over 3 seeds; seed-to-seed spread 0.030);
at 128 no demo document is split and packed equals padded (+-0.0003). The minimum piece trades the two (same runs
at 64 with split_pack's min_piece set by hand to 4: 5.2% of the tokens split, +0.0096, 92.6% real; to 16: 0.7%,
+0.0002, 89.6% real); 32 keeps >= 95% real tokens at the defaults. --pack 0 pads every document (nothing is split).
"""
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset.lm_dataset import PretrainDataset, collate_lm, collate_pretrain_packed
from model.flops import training_flops
from trainer.trainer_utils import (TrainLoop, add_heldout_flags, build_optimizer, build_parser, dataset_options,
                                   init_model, init_run, lm_heldout, model_config_from_args, parse_args, run_main)


def main():
    parser = build_parser("MiniMind Pretraining", save_weight="pretrain", epochs=1, batch_size=32,
                          learning_rate=5e-4, accumulation_steps=8, log_interval=100, save_interval=1000,
                          max_seq_len=340, data_path="dataset/pretrain_hq.jsonl", from_weight="none",
                          wandb_project="MiniMind-Pretrain", group_by_length=0)
    add_heldout_flags(parser)
    args = parse_args(parser)
    ctx = init_run(args)

    # ---------------------------------------------------------------- model and data
    config = model_config_from_args(args)
    model, tokenizer = init_model(config, args.from_weight, args.tokenizer_path, args.save_dir, ctx.device)
    dataset = PretrainDataset(args.data_path, tokenizer, max_length=args.max_seq_len,
                              **dataset_options(PretrainDataset, args))
    # --pack 1: documents fill rows of exactly max_seq_len (one may continue in the next row), see the docstring
    collate = partial(collate_pretrain_packed, max_len=args.max_seq_len) if args.pack else collate_lm
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, ctx.device, args.optimizer)
    loop = TrainLoop(args, ctx, model=model, optimizer=optimizer, dataset=dataset, collate_fn=collate,
                     config=config, stage="Pretrain", tokenizer=tokenizer,
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
