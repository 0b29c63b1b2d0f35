"""Held-out accuracy on checkable answers: greedy pass@1 and sampled pass@k, for scripts/eval_answers.py and the RL
stages' --eval_interval.

    from trainer.answer_eval import load_answer_set, evaluate_answers
    prompts, answers = load_answer_set("dataset/demo/rlaif.jsonl", tokenizer)
    result = evaluate_answers(model, tokenizer, prompts, answers, samples=8, temperature=0.8, seed=0,
                              max_new_tokens=64, max_prompt_len=128)
    result["accuracy"], result["pass_at_k"]              # greedy pass@1; share of prompts with >= 1 of k right

A record is any RLAIF/SFT JSONL line: the prompt is every message but the last, the last message holds the reference
answer, either a plain number ("82") or a reasoning trace whose <answer> block ends with one. A completion is right
when the RL rule reward says so (`trainer.rl_utils.answer_reward`: the last number of its last <answer> block, or
of the text, equals the reference), so this accuracy and the RL reward measure the same thing.

Evaluation never moves the training RNG: sampling runs inside torch.random.fork_rng, seeded with its own seed, so
a run with --eval_interval trains exactly like one without (tests/test_eval_answers.py checks the final weights).

Test: python -m pytest tests/test_eval_answers.py -q
"""
from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.distributed as dist

from trainer.rl_utils import ANSWER_BLOCK, answer_reward, final_answer, parse_number, rollout
from trainer.trainer_utils import Logger, UserError, user_path


def reference_answer(text: str) -> str | None:
    """The checkable reference in a record's last message: the message itself when it is a number, else the final
    answer of its <answer> block (an SFT reasoning trace); None when neither holds a number."""
    if parse_number(text) is not None:
        return text.strip()
    if not ANSWER_BLOCK.search(text or ""):
        return None
    value = final_answer(text)
    return None if value is None else str(int(value)) if value == int(value) else repr(value)


def load_answer_set(path: str, tokenizer, limit: int = 0) -> tuple[list[str], list[str]]:
    """(rendered prompts, reference answers) of the records in `path` whose last message is checkable; the first
    `limit` of them when limit > 0. Records without a checkable answer are skipped (and counted in the log)."""
    from dataset.lm_dataset import RLAIFDataset
    ds = RLAIFDataset(user_path(path), tokenizer)
    prompts, answers = [], []
    for i in range(len(ds)):
        item = ds[i]
        ref = reference_answer(item["answer"])
        if ref is None:
            continue
        prompts.append(item["prompt"])
        answers.append(ref)
        if limit and len(prompts) == limit:
            break
    if not prompts:
        raise UserError(f"{path}: no record's last message is a checkable answer (a number, or an <answer> block "
                        "ending in one); pass an RLAIF/SFT JSONL with numeric reference answers, e.g. "
                        "dataset/demo/rlaif.jsonl")
    skipped = len(ds) - len(prompts) if not limit else 0
    if skipped:
        Logger(f"note: {skipped} record(s) of {path} have no checkable answer and are not evaluated")
    return prompts, answers


def _check(model, tokenizer, prompts, answers, *, n: int, temperature: float, max_new_tokens: int,
           max_prompt_len: int, batch_size: int):
    """[len(prompts)][n] correctness (0/1) and the completions, generated in batches of `batch_size` rows."""
    per_call = max(1, batch_size // n)
    correct, texts = [], []
    for s in range(0, len(prompts), per_call):
        ro = rollout(model, tokenizer, prompts[s:s + per_call], num_return_sequences=n,
                     max_new_tokens=max_new_tokens, max_prompt_len=max_prompt_len, temperature=temperature)
        for i, ans in enumerate(answers[s:s + per_call]):
            rows = ro.completions[i * n:(i + 1) * n]
            correct.append([float(answer_reward(c, ans) or 0.0) for c in rows])
            texts.append(rows)
    return correct, texts


@torch.no_grad()
def evaluate_answers(model, tokenizer, prompts: list[str], answers: list[str], *, max_new_tokens: int,
                     max_prompt_len: int, samples: int = 0, temperature: float = 0.8, seed: int = 0,
                     batch_size: int = 64, autocast=None) -> dict:
    """Greedy accuracy (pass@1) over the prompts, and with samples=k > 0 also pass@k (share of prompts with at
    least one right answer among k samples at `temperature`) and the mean accuracy of those samples.

    Sampling is seeded with `seed` inside a forked RNG (CPU and the model's CUDA device), so the caller's RNG stream
    is untouched. autocast: a context manager factory to generate under (e.g. ctx.autocast). Returns the counts,
    the rates and one record per prompt (greedy completion, whether it is right, right samples out of k).
    """
    device = next(model.parameters()).device
    t0 = time.time()
    kw = dict(max_new_tokens=max_new_tokens, max_prompt_len=max_prompt_len, batch_size=batch_size)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            (autocast() if autocast is not None else contextlib.nullcontext()):
        torch.manual_seed(seed)
        greedy, greedy_text = _check(model, tokenizer, prompts, answers, n=1, temperature=0.0, **kw) \
            if prompts else ([], [])
        sampled = _check(model, tokenizer, prompts, answers, n=samples, temperature=temperature, **kw)[0] \
            if samples and prompts else None
    n = len(prompts)
    right = sum(g[0] for g in greedy)
    result = {"prompts": n, "greedy_correct": int(right), "accuracy": right / n if n else math.nan,
              "max_new_tokens": max_new_tokens, "seed": seed, "seconds": round(time.time() - t0, 2)}
    records = [{"prompt": p, "answer": a, "greedy": t[0], "greedy_correct": bool(g[0])}
               for p, a, t, g in zip(prompts, answers, greedy_text, greedy)]
    if sampled is not None:
        hits = sum(any(row) for row in sampled)
        result.update(samples=samples, temperature=temperature, pass_at_k_correct=int(hits),
                      pass_at_k=hits / n if n else math.nan,
                      sampled_accuracy=sum(map(sum, sampled)) / (n * samples) if n else math.nan)
        for rec, row in zip(records, sampled):
            rec["samples_correct"] = int(sum(row))
    result["records"] = records
    return result


# ----------------------------------------------------------------------------------------------------------------
# During RL training: --eval_interval / --eval_data_path

def add_eval_args(parser, measures: str = "greedy accuracy", logged_as: str = "eval_accuracy",
                  data: str = "held-out RLAIF/SFT JSONL whose last message is a checkable (numeric) answer; "
                              "prompts the run does not train on") -> None:
    """The RL stages' evaluation flags (train_agent passes its own measure and data description)."""
    parser.add_argument("--eval_interval", type=int, default=0,
                        help=f"每 N 个优化步评估一次 / {measures} on --eval_data_path every N optimizer steps and "
                             f"at the end, logged as {logged_as} (0 = off)")
    parser.add_argument("--eval_data_path", type=str, default=None, help=f"留出集 / {data}")


class PeriodicEval:
    """TrainLoop's `evaluate` hook: greedy held-out accuracy every --eval_interval optimizer steps and at the last.

        loop = TrainLoop(..., evaluate=PeriodicEval(args, tokenizer, ctx, model))

    Each rank generates for its share of the prompts (rank::world_size) and the counts are summed, so the result
    is the same on any number of processes. Generation uses the unwrapped model (no DDP collective inside) under
    the run's autocast and a forked RNG (see evaluate_answers): the training stream and order stay exactly as
    without evaluation. Returns None on steps without evaluation (off: --eval_interval 0).
    """

    def __init__(self, args, tokenizer, ctx, model):
        self.interval = int(getattr(args, "eval_interval", 0) or 0)
        self.args, self.tokenizer, self.ctx, self.model = args, tokenizer, ctx, model
        if self.interval < 0:
            raise UserError(f"--eval_interval {self.interval} must be >= 0 (0 = off)")
        if self.interval and not args.eval_data_path:
            raise UserError("--eval_interval needs --eval_data_path (a held-out JSONL with numeric answers)")
        self.prompts, self.answers = load_answer_set(args.eval_data_path, tokenizer) if self.interval else ([], [])
        self.seen = None  # the optimizer step of the previous call

    def __call__(self, opt_step: int, last: bool) -> dict | None:
        before, self.seen = (self.seen if self.seen is not None else opt_step - 1), opt_step
        # every multiple of the interval crossed since the previous call (several steps may pass between calls)
        if not self.interval or not (last or opt_step // self.interval > before // self.interval):
            return None
        ctx = self.ctx
        mine = slice(ctx.rank, None, ctx.world_size)
        res = evaluate_answers(self.model, self.tokenizer, self.prompts[mine], self.answers[mine],
                               max_new_tokens=self.args.max_gen_len, max_prompt_len=self.args.max_seq_len,
                               seed=getattr(self.args, "seed", 42), autocast=ctx.autocast)
        counts = torch.tensor([res["greedy_correct"], res["prompts"]], dtype=torch.float64, device=ctx.device)
        if dist.is_initialized():
            dist.all_reduce(counts)
        right, n = counts.tolist()
        return {"eval_accuracy": right / n}
