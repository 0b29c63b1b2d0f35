"""The training spine shared by every trainer/train_*.py script.

Everything that repeats across stages lives here exactly once: the common flags, distributed set-up and teardown,
seeding, the learning-rate schedule, the resumable data order, weight/checkpoint I/O, rank-0 logging and wandb, and
`TrainLoop`, which owns the step mechanics (accumulation, loss weighting, clipping, NaN guard, stop signals,
logging, saving, resume). A stage script keeps only what is specific to it: its dataset, its forward pass and its loss.

    loop = TrainLoop(args, ctx, model=model, optimizer=optimizer, dataset=ds, collate_fn=collate_lm, config=config)
    for batch in loop:                       # epochs, resume skip, lr schedule, device transfer, DDP no_sync
        with ctx.autocast():
            out = loop.model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        loop.backward(out.loss, units=loop.units, aux=out.aux_loss, logits_loss=out.loss)
    loop.finish()

Step semantics (deliberately unlike the reference, see ../shared/reference §7 items 1-6, 9-10, 12-13):
an optimizer step takes one accumulation window (`accumulation_steps` micro-batches per rank; an epoch's short tail
window is its own step, never leaked into the next epoch). The loss of a step is the mean over all its units
(supervised tokens; DPO: valid pairs) across the window and the ranks; --max_steps, --log_interval and
--save_interval count optimizer steps; the cosine LR follows the samples consumed; the final step is always logged
and saved; resume continues the exact global sample order (also after a change of world size or batch size) from
fp32 master weights; ETA only counts steps run in this process. What happens on NaN, Ctrl-C/SIGTERM, a full disk
and bad input, and the exit codes: spine/guards.py and README "When something goes wrong".

Modules (all names are re-exported here, so scripts import from trainer.trainer_utils only):
    spine/common.py      paths, UserError, Logger
    spine/flags.py       the shared flags and their defaults
    spine/runtime.py     distributed init/teardown, device, precision, seeding, DDP/compile wrapping
    spine/checkpoint.py  weights + sidecar, strict loading, resume files, init_model
    spine/guards.py      stop signals, non-finite checks, exit codes, start-up checks
    spine/logs.py        wandb (or a no-op) and the metrics JSONL
    spine/loop.py        get_lr, SkipBatchSampler, TrainLoop, optimizer
    spine/evaluate.py    held-out evaluation of the supervised stages (eval_loss, eval_bpb; DPO's reward accuracy)
"""
import sys
from pathlib import Path

# importable as trainer_utils from trainer/ too (the reference scripts ran from there)
if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.spine.common import (  # noqa: E402,F401
    is_main_process, Logger, ROOT, root_path, str2bool_int, user_path, UserError,
)
from trainer.spine.guards import (  # noqa: E402,F401
    all_finite, check_writable_dir, default_num_workers, EXIT_DIVERGED, EXIT_SIGNAL, EXIT_USER,
    remove_stale_temps, SaveError, StopSignals, TrainingDiverged, TrainingStopped, unwrap_worker_message,
)
from trainer.spine.flags import (  # noqa: E402,F401
    build_parser, check_max_seq_len, check_model_size, COMMON_DEFAULTS, dataset_options, parse_args, PATH_FLAGS,
    validate_args,
)
from trainer.spine.runtime import (  # noqa: E402,F401
    cleanup_distributed, cpu_has_fast_bf16, enable_grad_checkpointing, init_distributed_mode, init_run, is_sharded,
    reduce_mean, resolve_dtype, run_main, RunContext, setup_seed, unwrap, wrap_model,
)
from trainer.spine.checkpoint import (  # noqa: E402,F401
    ARCH_FLAGS, atomic_save, atomic_write_text, check_tokenizer, full_state_dict, init_model, lm_checkpoint,
    load_tokenizer, load_torch_file, load_trainable_state_dict, load_weights, model_config_from_args, read_sidecar, resume_path,
    save_weights, sidecar_path, tokenizer_fingerprint, trainable_state_dict, weight_path,
)
from trainer.spine.logs import init_wandb, MetricsFile, NoOpWandb  # noqa: E402,F401
from trainer.spine.loop import (  # noqa: E402,F401
    build_optimizer, get_lr, RolloutUpdates, SkipBatchSampler, supervised_tokens, TrainLoop,
)
from trainer.spine.evaluate import add_heldout_flags, HeldOutEval, lm_heldout  # noqa: E402,F401
