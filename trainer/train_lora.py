"""LoRA fine-tuning: the SFT loss, but only low-rank adapters on the attention projections train; the base is frozen.

    cd trainer && torchrun --nproc_per_node 2 train_lora.py --hidden_size 640 --num_hidden_layers 12 --use_moe 1 \
        --headwise_attn_output_gate 1 --use_wandb
    python trainer/train_lora.py --data_path dataset/demo/lora_identity.jsonl --hidden_size 64 --num_hidden_layers 2
    python eval_llm.py --weight full_sft --lora_weight lora_identity      # chat with base + adapters

Data: SFT-format JSONL (MiniMind's lora_identity.jsonl, or any domain set such as lora_medical.jsonl). Reads the base
from {from_dir}/{from_weight}_{hidden}{_moe}.pth (default out/full_sft_*.pth) and writes only the LoRA tensors to
{save_dir}/{lora_name}_{hidden}{_moe}.pth (default out/lora/lora_identity_*.pth) plus a sidecar JSON holding rank,
alpha, targets, the base weight (name and fingerprint) and the model config, which model_lora.apply_lora_from_file
reads back (and warns when the base differs). The resume file (checkpoints/{lora_name}_*_resume.pth) holds only the
LoRA tensors and their optimizer state.
"""
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset.lm_dataset import SFTDataset, collate_lm, collate_packed
from model.flops import lora_training_flops
from model.model_lora import (DEFAULT_TARGETS, apply_lora, base_fingerprint, count_lora_params, lora_state_dict,
                              parse_targets)
from trainer.trainer_utils import (Logger, TrainLoop, add_heldout_flags, build_optimizer, build_parser,
                                   check_max_seq_len, dataset_options, init_model, init_run, lm_heldout,
                                   model_config_from_args, parse_args, run_main, weight_path)


def main():
    # save_interval 1000, not MiniMind's 1 (which rewrote the model and optimizer every step, reference bug 32)
    parser = build_parser("MiniMind LoRA fine-tuning", skip=("save_weight",), save_dir="out/lora", epochs=50,
                          batch_size=32, learning_rate=1e-4, accumulation_steps=1, log_interval=10,
                          save_interval=1000, max_seq_len=340, data_path="dataset/lora_identity.jsonl",
                          from_weight="full_sft", wandb_project="MiniMind-LoRA")
    parser.add_argument("--lora_name", type=str, default="lora_identity",
                        help="LoRA 权重名 / adapter name: {save_dir}/{lora_name}_{hidden}{_moe}.pth")
    parser.add_argument("--lora_rank", type=int, default=8, help="LoRA 秩 r / rank of the update (Hu et al. 2021)")
    parser.add_argument("--lora_alpha", type=float, default=None,
                        help="LoRA alpha: the update is scaled by alpha/rank; default = rank (scale 1, as MiniMind)")
    parser.add_argument("--lora_target", type=str, default=",".join(DEFAULT_TARGETS),
                        help="要加 LoRA 的线性层名后缀, 逗号分隔 / nn.Linear name suffixes to adapt (e.g. add "
                             "gate_proj,up_proj,down_proj for the MLP)")
    parser.add_argument("--from_dir", type=str, default="out",
                        help="--from_weight 所在目录 / folder of the base weight (LoRA itself goes to --save_dir)")
    parser.extra_path_flags = ("from_dir",)
    add_heldout_flags(parser)
    args = parse_args(parser)
    # the spine names the resume/metrics files after save_weight; a LoRA run is named by its adapter
    args.save_weight = args.lora_name
    # record the resolved values: the weights sidecar stores args, and apply_lora_from_file reads them back
    args.lora_alpha = float(args.lora_rank if args.lora_alpha is None else args.lora_alpha)
    args.lora_target = ",".join(parse_targets(args.lora_target))
    ctx = init_run(args)

    # ---------------------------------------------------------------- model and data
    config = model_config_from_args(args)
    model, tokenizer = init_model(config, args.from_weight, args.tokenizer_path, args.from_dir, ctx.device)
    # the sidecar stores args: loading the adapters onto other base weights then warns (model_lora.check_base)
    args.lora_base_fingerprint = base_fingerprint(model)
    apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_target)
    total = sum(p.numel() for p in model.parameters())
    n_lora = count_lora_params(model)
    Logger(f"LLM 总参数量 / total params: {total / 1e6:.3f}M | LoRA 参数量 / LoRA params: {n_lora / 1e6:.4f}M "
           f"({n_lora / total:.2%}) | rank {args.lora_rank}, alpha {args.lora_alpha:g}, targets {args.lora_target}")
    check_max_seq_len(args.max_seq_len, tokenizer)
    dataset = SFTDataset(args.data_path, tokenizer, max_length=args.max_seq_len, **dataset_options(SFTDataset, args))
    # --pack 1: whole conversations share rows of <= max_seq_len, each attending to itself only
    collate = partial(collate_packed, max_len=args.max_seq_len) if args.pack else collate_lm
    # LoRA tensors only (--optimizer muon refuses: it is for whole-model training)
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, ctx.device, args.optimizer)
    loop = TrainLoop(args, ctx, model=model, optimizer=optimizer, dataset=dataset, collate_fn=collate,
                     config=config, stage="LoRA", tokenizer=tokenizer,
                     weights_path=weight_path(args.save_dir, args.lora_name, config.hidden_size, config.use_moe),
                     weights_state=lora_state_dict, evaluate=lm_heldout(args, ctx, model, tokenizer),
                     flops=lora_training_flops(config, n_lora),
                     run_name=f"MiniMind-LoRA-{args.lora_name}-Epoch-{args.epochs}-BS-{args.batch_size}-"
                              f"LR-{args.learning_rate}")

    # ---------------------------------------------------------------- train (frozen base: only adapters get grads)
    for batch in loop:
        with ctx.autocast():
            out = loop.model(batch["input_ids"], attention_mask=batch["attention_mask"],
                             position_ids=batch.get("position_ids"), labels=batch["labels"])
        loop.backward(out.loss, units=loop.units, aux=out.aux_loss, logits_loss=out.loss)
    loop.finish()


if __name__ == "__main__":
    run_main(main)
