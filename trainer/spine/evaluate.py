"""Held-out evaluation of the supervised stages: eval_loss and eval_bpb (pretrain, SFT, LoRA, reasoning distillation,
distillation), held-out reward accuracy and margin (DPO), every --eval_interval optimizer steps and at the end.

    evaluate = lm_heldout(args, ctx, model, tokenizer)            # in a stage script, before its TrainLoop
    loop = TrainLoop(..., dataset=dataset, evaluate=evaluate)     # the loop takes the held-out slice out of dataset
    python -m pytest tests/test_heldout_eval.py -q

Held-out data: --eval_data_path (a JSONL of the stage's format; at most --eval_samples of its records, a fixed seeded
choice), or else a held-out slice of --data_path: --eval_samples records chosen by a fixed seed (not --seed, so runs
with different seeds evaluate on the same records), excluded from training, the same on any number of processes.
The slice is taken by default only when it is at most 5% of the data (so small fine-tuning sets, and the demo
data, train on every record unless --eval_samples asks otherwise); the resume file records it, so a resumed run
keeps the training set it started with (a file from before this record resumes without a slice).
--eval_interval 0 turns the passes off but keeps the slice out of training: switching evaluation on or off never
changes what trains.

A pass: the unwrapped model in eval mode, no_grad, the run's autocast, a forked RNG (the training RNG stream and the
data order are untouched; the model's train/eval modes are restored), the held-out records sorted by length, dealt to
the ranks in turn and cut into --batch_size batches, padded (never packed: a packed row could split a document, and
its loss would then depend on the batching). Sums (NLL, tokens, bytes) are all-reduced, so eval_loss is
token-weighted over all ranks:

    eval_loss = sum of the NLL of every supervised target token / their number          (nats per token)
    eval_bpb  = sum of the NLL of the supervised targets that spell text / (ln 2 x UTF-8 bytes they spell)

eval_bpb counts bytes per token id from the vocabulary (token_bytes): comparable across tokenizers and vocab sizes.
Special tokens (<|im_end|>...) spell no text: their NLL is in eval_loss but not in eval_bpb (nanochat's convention).
An `observer` (model statistics, e.g. model/model_stats.py's ModelStats) is entered around the pass's forwards:
`with observer(raw_model) as st: ...; st.all_reduce(); metrics |= st.summary()`. Keys with "/" (per-layer values) go
to wandb and the metrics JSONL only, not to the progress line.
"""
from __future__ import annotations

import contextlib
import math
import random

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Dataset

from trainer.spine.common import Logger, UserError
from trainer.spine.flags import dataset_options
from trainer.spine.loop import _to_device
from trainer.spine.runtime import is_sharded

HELDOUT_SEED = "minimind-heldout"  # fixed: the held-out records do not depend on --seed
DEFAULT_MAX_SHARE = 0.05  # the default slice is taken only when it is at most this share of the data


def add_heldout_flags(parser, eval_samples: int = 500, eval_interval: int = 1000, what: str = "eval_loss, eval_bpb"):
    """--eval_data_path / --eval_interval / --eval_samples of a supervised stage (RL stages: answer_eval's)."""
    parser.add_argument("--eval_interval", type=int, default=eval_interval,
                        help=f"留出集评估间隔 / held-out evaluation ({what}) every N optimizer steps and after the "
                             "last; 0 = no evaluation (a held-out slice stays out of training all the same)")
    parser.add_argument("--eval_data_path", type=str, default=None,
                        help="留出集 jsonl (与训练数据同格式) / held-out JSONL in the stage's format (at most "
                             "--eval_samples of its records); default: a held-out slice of --data_path")
    parser.add_argument("--eval_samples", type=int, default=None,
                        help=f"留出样本数 / held-out records evaluated (default {eval_samples}). Without "
                             "--eval_data_path they are a fixed seeded slice of --data_path, excluded from training, "
                             "the same on any number of processes; by default taken only when they are at most 5%% "
                             "of the data (pass a number to hold out on smaller data); 0 = hold out nothing")
    parser.set_defaults(default_eval_samples=eval_samples)


def heldout_indices(n: int, k: int) -> list[int]:
    """k of range(n), sorted, chosen by a fixed seed: the same records whatever --seed, world size or batch size."""
    return sorted(random.Random(f"{HELDOUT_SEED}-{n}").sample(range(n), k))


class TrainView(Dataset):
    """The training records of `base` without the held-out ones (`excluded`, sorted): index i is the i-th remaining
    record. Everything else (lengths, bytes_per_token, sequences, targets_of...) reads through to `base`."""

    def __init__(self, base, excluded: list[int]):
        keep = torch.ones(len(base), dtype=torch.bool)
        keep[torch.tensor(excluded, dtype=torch.long)] = False
        self.base, self.index = base, keep.nonzero().squeeze(1)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        return self.base[int(self.index[i])]

    @property
    def lengths(self):
        return self.base.lengths[self.index]

    def __getattr__(self, name):
        if name.startswith("__") or name in ("base", "index"):  # unpickling in a DataLoader worker: no recursion
            raise AttributeError(name)
        return getattr(self.base, name)


def token_bytes(tokenizer, vocab_size: int) -> tuple[torch.Tensor, bool]:
    """(UTF-8 bytes each token id spells [vocab_size], exact).

    Counted per token, not by decoding: byte-level BPE (this repo's tokenizer, GPT-2's, Qwen's, MiniMind's) writes
    each byte as one character of the token's vocabulary string, so a token's byte count is that string's length and
    the counts of a text's tokens add up to the text's UTF-8 length exactly, also where a character's bytes are split
    over two tokens ('你' is 3 bytes; decoding one half alone gives U+FFFD, 3 bytes of its own, and would miscount).
    Added tokens count their content (<think> = 7 bytes), special tokens 0 (they spell no text). Other tokenizers
    (SentencePiece...) decode each token alone: exact = False, and the caller says the number is approximate.
    """
    table = torch.zeros(vocab_size, dtype=torch.long)
    n = min(vocab_size, len(tokenizer))
    added = tokenizer.added_tokens_decoder
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    exact = type(decoder).__name__ == "ByteLevel"
    strings = tokenizer.convert_ids_to_tokens(list(range(n)))
    for i in range(n):
        if i in added:
            table[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
        elif exact:
            table[i] = len(strings[i])
        else:
            table[i] = len(tokenizer.decode([i]).encode("utf-8"))
    return table, exact


def lm_sums(logits: torch.Tensor, labels: torch.Tensor, table: torch.Tensor) -> dict:
    """Sums of one batch for eval_loss / eval_bpb: logits [B, T, V] (position t predicts label t+1), labels [B, T]
    (-100 = not supervised), table = token_bytes. fp32 CE, row by row (no fp32 copy of the whole [B, T, V])."""
    targets = labels[:, 1:]
    sup = targets != -100
    nll = torch.stack([F.cross_entropy(logits[b, :-1].float(), targets[b], ignore_index=-100, reduction="none")
                       for b in range(logits.shape[0])])
    nbytes = table.to(targets.device)[targets.clamp(min=0)] * sup
    return {"nll": nll.sum(), "tokens": sup.sum(), "text_nll": (nll * (nbytes > 0)).sum(), "bytes": nbytes.sum()}


LM_KEYS = ("nll", "tokens", "text_nll", "bytes")


def lm_summary(s: dict) -> dict:
    if not s["tokens"]:
        return {}
    out = {"eval_loss": s["nll"] / s["tokens"]}
    if s["bytes"]:
        out["eval_bpb"] = s["text_nll"] / (math.log(2) * s["bytes"])
    return out


class HeldOutEval:
    """TrainLoop's `evaluate` hook for a supervised stage (see the module docstring).

    score(model, batch) -> dict of summed tensors (the names in `keys`) for one device batch (run under no_grad and
        the run's autocast);
    summarize(sums over all ranks and batches) -> metrics. collate_fn: a padding collate (collate_lm, collate_dpo).
    observer: optional factory, observer(raw_model) -> context manager with all_reduce() and summary().
    TrainLoop calls hold_out(dataset, resume) once, after reading the resume file; `held_out` is what the resume
    file records.
    """

    def __init__(self, args, ctx, model, *, score, keys, summarize, collate_fn, observer=None):
        self.args, self.ctx, self.model = args, ctx, model
        self.score, self.summarize, self.collate_fn, self.observer = score, summarize, collate_fn, observer
        self.keys = sorted(keys)
        self.interval = int(args.eval_interval)
        if self.interval < 0:
            raise UserError(f"--eval_interval {self.interval} must be >= 0 (0 = no evaluation)")
        if args.eval_samples is not None and args.eval_samples < 0:
            raise UserError(f"--eval_samples {args.eval_samples} must be >= 0 (0 = hold out nothing)")
        self.held_out = None  # {"samples": k, "records": n} of --data_path, for the resume file
        self.source, self.items, self._batches, self.seen = None, [], None, None

    # -- the held-out records
    def _slice_size(self, n: int, resume: dict | None) -> int:
        args = self.args
        if resume is not None:  # the training set is the one the run started with
            rec = resume.get("heldout")
            k = rec["samples"] if rec else 0
            if args.eval_samples is not None and args.eval_samples != k and not args.eval_data_path:
                Logger(f"NOTE: this run started with {k} held-out records of --data_path; it keeps them (--eval_samples"
                       f" {args.eval_samples} applies to a new run)")
            return k
        if args.eval_data_path:
            return 0
        if args.eval_samples is not None:
            if args.eval_samples >= n:
                raise UserError(f"--eval_samples {args.eval_samples} would hold out all {n} records of "
                                f"{args.data_path}; pass fewer (e.g. {max(n // 20, 1)}) or an --eval_data_path")
            return args.eval_samples
        k = args.default_eval_samples
        if k > DEFAULT_MAX_SHARE * n:
            if self.interval:
                Logger(f"NOTE: no held-out evaluation: {args.data_path} has {n:,} records, too few to hold out "
                       f"{k} by default (at most {DEFAULT_MAX_SHARE:.0%}); pass --eval_samples N to hold out N "
                       "records, or --eval_data_path")
            return 0
        return k

    def hold_out(self, dataset, resume: dict | None):
        """The training dataset without the held-out slice; picks the records evaluated."""
        n = len(dataset)
        k = self._slice_size(n, resume)
        self.held_out = {"samples": k, "records": n}
        excluded = heldout_indices(n, k) if k else []
        if self.args.eval_data_path:
            cls = type(dataset)
            data = cls(self.args.eval_data_path, dataset.tokenizer, max_length=dataset.max_length,
                       **dataset_options(cls, self.args))
            m = self.args.eval_samples if self.args.eval_samples is not None else self.args.default_eval_samples
            self.source = (data, heldout_indices(len(data), min(m, len(data))))
            where = f"{len(self.source[1])} of the {len(data):,} records of {self.args.eval_data_path}"
        else:
            self.source = (dataset, excluded)
            where = f"{k} of the {n:,} records of {self.args.data_path} (a fixed seeded choice, not trained on)"
        if k and self.args.eval_data_path:
            Logger(f"held out of training: {k} records of {self.args.data_path} (kept from the run's start)")
        if self.source[1] and self.interval:
            Logger(f"held-out evaluation: {where}, every {self.interval} optimizer steps and after the last")
        elif self.source[1]:
            Logger(f"held out, not evaluated (--eval_interval 0): {where}")
        return TrainView(dataset, excluded) if k else dataset

    def _rank_batches(self) -> list:
        """This rank's CPU batches, built at the first pass and kept. Records are sorted by length (less padding),
        dealt to the ranks in turn, and every rank cuts its share into the same number of batches (FSDP's forwards
        are collective); a rank left without records in a batch (fewer records than batches) forwards the first
        record again, with weight 0 (`None` marks it)."""
        if self._batches is not None:
            return self._batches
        data, idx = self.source
        lengths = data.lengths
        order = sorted(idx, key=lambda i: (int(lengths[i]), i))
        ctx, bs = self.ctx, self.args.batch_size
        mine = order[ctx.rank::ctx.world_size]
        n_batches = math.ceil(math.ceil(len(order) / ctx.world_size) / bs)
        sizes = [len(c) for c in torch.arange(len(mine)).tensor_split(n_batches)] if n_batches else []
        batches, at = [], 0
        for size in sizes:
            batches.append(self.collate_fn([data[i] for i in mine[at:at + size]]) if size else None)
            at += size
        self._dummy = self.collate_fn([data[order[0]]])
        self._batches = batches
        return batches

    # -- the pass
    def __call__(self, opt_step: int, last: bool) -> dict | None:
        before, self.seen = (self.seen if self.seen is not None else opt_step - 1), opt_step
        if not self.interval or not self.source or not self.source[1]:
            return None
        if not (last or opt_step // self.interval > before // self.interval):
            return None
        return self.evaluate()

    def evaluate(self) -> dict:
        """One pass over the held-out records; the metrics, summed over all ranks."""
        ctx, model = self.ctx, self.model
        modes = [(m, m.training) for m in model.modules()]
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        stats = {}
        sums = torch.zeros(len(self.keys), dtype=torch.float64, device=ctx.device)
        try:
            model.eval()
            observing = self.observer(model) if self.observer is not None else contextlib.nullcontext()
            with torch.random.fork_rng(devices=devices), torch.no_grad(), observing as st:
                for batch in self._rank_batches():
                    if batch is None and not is_sharded(model):
                        continue
                    dev = _to_device(batch if batch is not None else self._dummy, ctx.device, False)
                    with ctx.autocast():
                        s = self.score(model, dev)
                    if batch is not None:
                        sums += torch.stack([torch.as_tensor(s[k], dtype=torch.float64, device=ctx.device)
                                             for k in self.keys])
                if dist.is_initialized():
                    dist.all_reduce(sums)
                if st is not None:
                    st.all_reduce()
                    stats = dict(st.summary())
        finally:
            for m, training in modes:
                m.training = training
        metrics = {k: float(v) for k, v in self.summarize(dict(zip(self.keys, sums.tolist()))).items()}
        return {**metrics, **stats}


def lm_heldout(args, ctx, model, tokenizer, observer=None) -> HeldOutEval:
    """eval_loss / eval_bpb of a causal LM (pretrain, SFT, LoRA, reasoning distillation, distillation's student):
    plain next-token CE over the supervised tokens, whatever the stage's training loss weights."""
    from dataset.lm_dataset import collate_lm
    table, exact = token_bytes(tokenizer, model.config.vocab_size)
    if not exact:
        Logger("NOTE: the tokenizer is not byte-level BPE: eval_bpb counts each token's bytes decoded alone, "
               "approximate where a character spans two tokens")

    def score(m, batch):
        logits = m(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return lm_sums(logits, batch["labels"], table)

    return HeldOutEval(args, ctx, model, score=score, keys=LM_KEYS, summarize=lm_summary, collate_fn=collate_lm,
                       observer=observer)
