"""What the RL stages (train_ppo.py, train_grpo.py, train_spo.py, train_agent.py) share: prompts, rollouts,
log-probs, rewards.

    from trainer.rl_utils import RewardScorer, completion_logprobs, k3_kl, masked_mean, rollout
    ro = rollout(loop.raw_model, tokenizer, batch["prompt"], num_return_sequences=8, max_new_tokens=128,
                 max_prompt_len=66)
    rewards, reward_metrics = scorer(ro.prompts, ro.completions, answers)      # before any policy forward
    with ctx.autocast():
        logp, aux = completion_logprobs(loop.model, ro)                         # policy, with grad
        with torch.no_grad():
            ref_logp, _ = completion_logprobs(ref_model, ro)                    # same precision as the policy

GRPO and SPO hand a rollout batch to the loop (several optimizer steps per rollout, trainer/spine/loop.py):
    for batch in loop:                                   # one prompt batch per rollout
        b = sample_and_score(loop.raw_model, tokenizer, scorer, batch["prompt"], batch["answer"], args, ctx, G)
        policy_updates(loop, b.rollout, advantages, args, ctx, ref_model=ref, metrics=rl_metrics(b))

Conventions every RL script relies on:
- Prompts are left-padded (so all completions start at column P) and never lose their chat markup: a prompt longer
  than max_prompt_len is fitted by the chat format's one rule (model/chat_format.py fit_prompt: oldest turns first,
  then the middle of the last message), unlike the reference, which cut the first tokens away (system/user header
  included; reference §7 item 30).
- Log-probs are computed with the rollout's attention mask; the model derives each row's positions from it, so a
  left-padded row scores exactly as it would alone (tested). Policy, old policy and reference all go through
  `completion_logprobs` under the caller's autocast: equal weights give equal log-probs (ratio 1, KL 0), unlike the
  reference's bf16-vs-fp32 mix (§7 item 28). The log-softmax runs in fp32, chunked, without keeping an fp32 copy
  of the logits for backward (`selected_logprobs`). Pass temperature=T to score the distribution the rollout
  sampled from, softmax(logits / T).
- Rewards (`RewardScorer`) are computed right after the rollout, before the policy forward, so a reward model's
  memory peak never overlaps the policy's activations.

Test: python -m pytest tests/test_rl_utils.py -q
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import re
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import chat_format
from model.chat_format import prompt_messages
from trainer.rl_objectives import (IS_LEVELS, LOSS_TYPES, default_epsilon_high, k3_kl,  # noqa: F401 (re-exported)
                                   masked_mean, objective_units, policy_objective)
from trainer.trainer_utils import Logger, UserError, is_sharded, root_path, str2bool_int, unwrap, user_path

# The reference's default (../../internlm2-1_8b-reward from trainer/), written relative to the repo root.
DEFAULT_REWARD_MODEL_PATH = "../internlm2-1_8b-reward"
RM_CLIP = 3.0  # reward-model scores are clipped to [-3, 3]
FORMAT_REWARD, TAG_REWARD = 0.5, 0.25
ADV_EPS = 1e-4  # added to the reward std of a group before dividing


# ----------------------------------------------------------------------------------------------------------------
# Flags shared by the RL scripts

def add_rl_args(parser: argparse.ArgumentParser, *, beta: float = 0.02, max_gen_len: int = 1536,
                reasoning: int = 1, rewards: bool = True) -> argparse.ArgumentParser:
    """--beta --max_gen_len --reasoning --reward_model_path --answer_reward --temperature (reference §1.0), and
    --mini_batch_size (several optimizer steps per rollout batch). rewards=False leaves out the three reward-source
    flags (--reasoning --reward_model_path --answer_reward) for a stage with its own reward (train_agent.py)."""
    parser.add_argument("--beta", type=float, default=beta,
                        help="KL 惩罚系数 / weight of the k3 KL to the frozen reference policy (MiniMind 0.02; "
                             "the GRPO paper used 0.04; DAPO and Dr. GRPO use 0). 0 builds no reference model: one "
                             "policy's memory and one forward per rollout saved")
    parser.add_argument("--max_gen_len", type=int, default=max_gen_len,
                        help="生成的最大长度 / max new tokens per completion (--max_seq_len is the prompt length)")
    if rewards:
        parser.add_argument("--reasoning", type=str2bool_int, default=reasoning, choices=[0, 1],
                            help="推理模型: 从 reason 权重开始并加 <think>/<answer> 格式奖励 / start from "
                                 "`reason` weights and add the format/tag rewards; 0: start from full_sft, no "
                                 "format reward")
        parser.add_argument("--reward_model_path", type=str, default=DEFAULT_REWARD_MODEL_PATH,
                            help="奖励模型本地目录 / local dir of a reward model: an HF sequence classifier or an "
                                 "InternLM-style model with get_score (e.g. internlm2-1_8b-reward); 'none' = "
                                 "rule-based rewards only (also the automatic fallback when the default path does "
                                 "not exist)")
        parser.add_argument("--answer_reward", type=float, default=1.0,
                            help="可验证答案奖励权重 / weight of the rule-based reward for prompts whose reference "
                                 "answer is a number (the demo arithmetic prompts): +w if the final answer equals "
                                 "it; 0 = off")
    parser.add_argument("--temperature", type=float, default=0.8, help="采样温度 / sampling temperature")
    parser.add_argument("--mini_batch_size", type=int, default=0,
                        help="每个优化步的样本数 / completions per optimizer step per rank: a rollout batch "
                             "(--batch_size x --accumulation_steps prompts, x --num_generations in GRPO) is split "
                             "into ceil(its size / this) near-equal mini-batches, one optimizer step each; 0 = the "
                             "whole rollout batch in one step")
    return parser


def rl_from_weight(args) -> str:
    """The policy/reference init weight: --from_weight, or (reference rule) `reason` with --reasoning 1, else
    `full_sft`."""
    fw = getattr(args, "from_weight", "auto")
    if fw in (None, "auto"):
        return "reason" if getattr(args, "reasoning", 0) else "full_sft"
    return fw


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen reference policy: eval mode, no grads, never wrapped in DDP. Make it before TrainLoop loads a
    resume file, so the reference stays the initial weights."""
    ref = copy.deepcopy(unwrap(model))
    ref.eval()
    ref.requires_grad_(False)
    if dist.is_initialized():
        # DDP gives the policy rank 0's weights; the reference must match it on every rank even when the ranks
        # started from different random inits (--from_weight none)
        for t in list(ref.parameters()) + list(ref.buffers()):
            dist.broadcast(t.data, src=0)
    return ref


# ----------------------------------------------------------------------------------------------------------------
# Prompts and rollouts

def fit_prompt(tokenizer, prompt: str, max_len: int) -> tuple[list[int], bool]:
    """Token ids of a rendered chat prompt, at most max_len of them (model/chat_format.py fit_prompt), and whether
    it was shortened. A prompt whose system turn and markup alone exceed max_len is a UserError."""
    try:
        fitted = chat_format.fit_prompt(tokenizer, prompt, max_len)
    except ValueError as e:
        raise UserError(f"an RL prompt does not fit --max_seq_len {max_len}: {e}; raise --max_seq_len or shorten "
                        "the data's system prompt") from None
    return fitted.ids, bool(fitted.dropped or fitted.cut_tokens)


_warned_truncation = False


def encode_prompts(tokenizer, prompts: list[str], max_prompt_len: int, device) -> dict:
    """Left-padded prompt batch: dict(input_ids [B, P], attention_mask [B, P], num_shortened). See fit_prompt."""
    global _warned_truncation
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows, shortened = [], 0
    for p in prompts:
        ids, cut = fit_prompt(tokenizer, p, max_prompt_len)
        rows.append(ids)
        shortened += cut
    if shortened and not _warned_truncation:
        Logger(f"note: {shortened} prompt(s) longer than --max_seq_len {max_prompt_len} tokens were shortened by "
               "dropping their oldest turns, then the middle of their last message (chat markup kept); raise "
               "--max_seq_len to avoid it")
        _warned_truncation = True
    input_ids, attention_mask = left_pad(rows, pad)
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "num_shortened": shortened}


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows as one left-padded batch: (input_ids [B, W], attention_mask [B, W]), W the longest row."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, width - len(r):] = 1
    return input_ids, attention_mask


@dataclass
class Rollout:
    input_ids: torch.Tensor        # [N, P+R] left-padded prompt + completion (completion right-padded with pad id)
    attention_mask: torch.Tensor   # [N, P+R] 1 on real prompt tokens and on completion tokens up to and incl. EOS
    prompt_len: int                # P (width of the padded prompt block)
    completion_ids: torch.Tensor   # [N, R]
    completion_mask: torch.Tensor  # [N, R] float, 1 up to and including the first EOS (all R if no EOS)
    completions: list[str]         # decoded completions (skip_special_tokens=True)
    prompts: list[str]             # the prompt string of each row (repeated num_return_sequences times)

    truncated: torch.Tensor | None = None  # [N] bool: no EOS within the generated tokens (cut at max_new_tokens)

    @property
    def num_tokens(self) -> int:
        """Generated tokens that count (up to and including EOS)."""
        return int(self.completion_mask.sum().item())

    def select(self, rows: torch.Tensor) -> "Rollout":
        """These rows only, without the prompt and completion columns that are padding in all of them."""
        rows = rows.to(self.input_ids.device)
        P = self.prompt_len
        am = self.attention_mask[rows]
        lead = max(int(am[:, :P].sum(dim=1).max()), 1)  # the longest prompt (left-padded) of these rows
        # the longest completion, from the attention mask: a tool rollout's loss mask has 0s inside (tool turns)
        R = max(int(am[:, P:].sum(dim=1).max()), 1)
        cols = slice(P - lead, P + R)
        picked = rows.tolist()
        return Rollout(input_ids=self.input_ids[rows][:, cols], attention_mask=am[:, cols], prompt_len=lead,
                       completion_ids=self.completion_ids[rows][:, :R],
                       completion_mask=self.completion_mask[rows][:, :R],
                       completions=[self.completions[i] for i in picked], prompts=[self.prompts[i] for i in picked],
                       truncated=self.truncated[rows] if self.truncated is not None else None)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """One rollout of several (prompt blocks left-padded, completions right-padded to the widest)."""
    if len(parts) == 1:
        return parts[0]
    P = max(r.prompt_len for r in parts)
    R = max(r.completion_ids.shape[1] for r in parts)

    def pad(t, left, right, value):
        return F.pad(t, (left, right), value=value)

    ids, am, cids, cm = [], [], [], []
    for r in parts:
        left, right = P - r.prompt_len, R - r.completion_ids.shape[1]
        ids.append(pad(r.input_ids, left, right, pad_id))
        am.append(pad(r.attention_mask, left, right, 0))
        cids.append(pad(r.completion_ids, 0, right, pad_id))
        cm.append(pad(r.completion_mask, 0, right, 0.0))
    return Rollout(input_ids=torch.cat(ids), attention_mask=torch.cat(am), prompt_len=P,
                   completion_ids=torch.cat(cids), completion_mask=torch.cat(cm),
                   completions=[c for r in parts for c in r.completions], prompts=[p for r in parts for p in r.prompts],
                   truncated=torch.cat([r.truncated for r in parts]))


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1.0 up to and including the first EOS of each row; the whole row when it has no EOS."""
    R = completion_ids.shape[1]
    is_eos = completion_ids == eos_id
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), torch.full_like(is_eos[:, 0], R - 1,
                                                                                         dtype=torch.long))
    return (torch.arange(R, device=completion_ids.device)[None] <= first[:, None]).float()


@torch.no_grad()
def rollout(model, tokenizer, prompts: list[str], *, num_return_sequences: int = 1, max_new_tokens: int = 256,
            max_prompt_len: int = 512, temperature: float = 0.8, top_p: float = 1.0, top_k: int = 0) -> Rollout:
    """Sample completions with HF generate on the plain module (eval mode, train mode restored afterwards).

    Rows are grouped by prompt: rows i*n .. i*n+n-1 belong to prompts[i] (n = num_return_sequences). Call it under
    ctx.autocast() for speed; the log-probs that train are recomputed by `completion_logprobs` anyway.
    temperature 0 means greedy decoding.
    """
    model = unwrap(model)
    device = next(model.parameters()).device
    enc = encode_prompts(tokenizer, prompts, max_prompt_len, device)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sample = temperature > 0
    gen_kw = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if sample else \
        dict(do_sample=False)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                             pad_token_id=pad, eos_token_id=eos, use_cache=True, **gen_kw,
                             # --fsdp 1: every forward all-gathers the layers, so a rank that has finished keeps
                             # stepping until all have
                             synced_gpus=is_sharded(model))
    finally:
        model.train(was_training)
    P = enc["input_ids"].shape[1]
    completion_ids = out[:, P:]
    completion_mask = completion_mask_from_ids(completion_ids, eos)
    prompt_mask = enc["attention_mask"].repeat_interleave(num_return_sequences, dim=0)
    lengths = completion_mask.sum(dim=1).long().tolist()
    completions = [tokenizer.decode(row[:n].tolist(), skip_special_tokens=True)
                   for row, n in zip(completion_ids, lengths)]
    return Rollout(input_ids=out, attention_mask=torch.cat([prompt_mask, completion_mask.long()], dim=1),
                   prompt_len=P, completion_ids=completion_ids, completion_mask=completion_mask,
                   completions=completions, prompts=[p for p in prompts for _ in range(num_return_sequences)],
                   truncated=~(completion_ids == eos).any(dim=1))


# ----------------------------------------------------------------------------------------------------------------
# Log-probs

class _SelectedLogProb(torch.autograd.Function):
    """log_softmax(logits / T)[target] in fp32, row-chunked; backward recomputes the softmax chunk by chunk.

    Saves only the logits (in their own dtype) and one fp32 logsumexp per row, so bf16 logits never get a full fp32
    twin kept alive for backward, which log_softmax(logits.float() / T) + gather would do.
    """

    @staticmethod
    def forward(ctx, logits, targets, chunk_rows, inv_temp):
        V = logits.shape[-1]
        flat, t = logits.reshape(-1, V), targets.reshape(-1)
        acc = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.empty(t.shape, dtype=acc, device=logits.device)
        out = torch.empty(t.shape, dtype=acc, device=logits.device)
        for s in range(0, flat.shape[0], chunk_rows):
            x = flat[s:s + chunk_rows].to(acc)
            if inv_temp != 1.0:
                x = x * inv_temp
            lse[s:s + chunk_rows] = torch.logsumexp(x, dim=-1)
            out[s:s + chunk_rows] = x.gather(-1, t[s:s + chunk_rows, None]).squeeze(-1) - lse[s:s + chunk_rows]
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk_rows, ctx.inv_temp = chunk_rows, inv_temp
        return out.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, lse = ctx.saved_tensors
        V, k = logits.shape[-1], ctx.inv_temp
        flat, t = logits.reshape(-1, V), targets.reshape(-1)
        g = grad_out.reshape(-1).to(lse.dtype) * k
        grad = torch.empty_like(flat)
        for s in range(0, flat.shape[0], ctx.chunk_rows):
            e = s + ctx.chunk_rows
            # d logp_t / d logits = (onehot(t) - softmax(logits / T)) / T
            p = torch.exp(flat[s:e].to(lse.dtype) * k - lse[s:e, None]).mul_(-g[s:e, None])
            p.scatter_add_(-1, t[s:e, None], g[s:e, None])
            grad[s:e] = p.to(grad.dtype)
        return grad.view_as(logits), None, None, None


def selected_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None,
                      temperature: float = 1.0) -> torch.Tensor:
    """[..., V] logits, [...] target ids -> [...] fp32 log-probs of the targets under softmax(logits / temperature)
    (differentiable)."""
    if chunk_rows is None:
        chunk_rows = max(1, (1 << 25) // logits.shape[-1])  # ~128 MB of fp32 per chunk
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _SelectedLogProb.apply(logits, targets, chunk_rows, 1.0 / temperature)


def completion_logprobs(model, rollout_or_ids, attention_mask: torch.Tensor | None = None,
                        prompt_len: int | None = None, *, temperature: float = 1.0):
    """(logps [N, R] fp32, aux_loss) of the completion tokens under `model`, from one forward.

    temperature: score the distribution the rollout sampled from, softmax(logits / T) (pass the sampling
    temperature; 0, i.e. greedy, and 1 both mean plain logits). The division happens inside the fp32 chunks, no
    extra logits tensor is made.

    The attention mask is passed (left padding and post-EOS pads are not attended; positions come from it) and
    the lm_head runs only over the R + 1 last positions (the R that predict completion tokens, plus one). Call it
    under the caller's ctx.autocast() for policy, old policy and reference alike, and under torch.no_grad() for the
    frozen ones. aux_loss is the MoE load-balancing loss of this same forward (0 for dense models and in eval mode).

    Under --use_compile 1 the lengths change every step. The sequence dim is marked dynamic and logits_to_keep is a
    plain int, so dynamo traces dynamic-shape graphs: after the first steps (where the model's own graph breaks see
    their int arguments change once) new prompt/completion lengths and batch sizes reuse the compiled graphs
    (tests/test_rl_utils.py counts the frames). Padding completions to length buckets is therefore not needed; it
    would only add padded work.
    """
    if isinstance(rollout_or_ids, Rollout):
        ids, attention_mask, P = rollout_or_ids.input_ids, rollout_or_ids.attention_mask, rollout_or_ids.prompt_len
    else:
        ids, P = rollout_or_ids, prompt_len
        if attention_mask is None or P is None:
            raise ValueError("completion_logprobs(ids, attention_mask, prompt_len): both are needed with raw ids")
    R = ids.shape[1] - P
    if P < 1 or R < 1:
        raise ValueError(f"need a non-empty prompt and completion, got prompt_len {P}, completion length {R}")
    # Every step has new prompt and completion lengths. Marking the sequence dim dynamic up front lets a compiled
    # policy (--use_compile 1) trace one dynamic-shape graph on the first step instead of a static one that the
    # second step throws away (eager ignores the mark).
    torch._dynamo.maybe_mark_dynamic(ids, 1)
    torch._dynamo.maybe_mark_dynamic(attention_mask, 1)
    # logits only for the last R + 1 positions (the HF int form of logits_to_keep): rows P-1 .. P+R-2 predict the
    # R completion tokens; the final row predicts past the end and is scored against a dummy target and dropped,
    # which is cheaper than slicing the logits (a copy of [N, R, V]) and keeps the int a plain dynamic size.
    out = model(ids, attention_mask=attention_mask, logits_to_keep=R + 1)
    T = temperature if temperature > 0 else 1.0
    targets = F.pad(ids[:, P:], (0, 1))
    return selected_logprobs(out.logits, targets, temperature=T)[:, :R], out.aux_loss


# ----------------------------------------------------------------------------------------------------------------
# Rewards

THINK_ANSWER = re.compile(r"^<think>\n.*?\n</think>\n\n?<answer>\n.*?\n</answer>$", re.S)
TAGS = chat_format.REASONING_TAGS
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.S)


def format_reward(text: str) -> float:
    """Reference §1.11: +0.5 if the whole text is <think>\\n...\\n</think>\\n(\\n)<answer>\\n...\\n</answer>, plus
    +0.25 for each of the four tags that occurs exactly once (max 1.5)."""
    r = FORMAT_REWARD if THINK_ANSWER.match(text) else 0.0
    return r + TAG_REWARD * sum(text.count(tag) == 1 for tag in TAGS)


def parse_number(s: str) -> float | None:
    """The reference answer as a number if it is one (e.g. "7", "-2.5", "1,024"), else None (not checkable)."""
    s = (s or "").strip().replace(",", "")
    return float(s) if NUMBER.fullmatch(s) else None


def final_answer(text: str) -> float | None:
    """The completion's final answer: the last number inside the last <answer>...</answer> block if there is one,
    else the last number anywhere in the text ("5+4=9." -> 9)."""
    blocks = ANSWER_BLOCK.findall(text)
    nums = NUMBER.findall((blocks[-1] if blocks else text).replace(",", ""))
    return float(nums[-1]) if nums else None


def answer_reward(completion: str, answer: str) -> float | None:
    """1.0 / 0.0 when the reference answer is a number and the final answer equals / differs; None if the
    reference answer is not a number (nothing to check)."""
    target = parse_number(answer)
    if target is None:
        return None
    got = final_answer(completion)
    return float(got is not None and abs(got - target) <= 1e-6 * max(1.0, abs(target)))


def resolve_reward_model_path(value: str | None) -> tuple[str | None, bool]:
    """(absolute path or None for 'none', is_default). The default resolves against the repo root, a path the user
    typed against the current directory (the same rule as every other path flag)."""
    if value is None or str(value).strip().lower() in ("", "none"):
        return None, False
    if value == DEFAULT_REWARD_MODEL_PATH:
        return os.path.normpath(root_path(value)), True
    return user_path(value), False


def _rank0_first(fn):
    """Run fn on global rank 0 first, then on the first rank of every other node, then on the rest: a remote-code
    module cache (one per machine unless shared) is written once per machine, never raced."""
    if not dist.is_initialized():
        return fn()
    phase = 0 if dist.get_rank() == 0 else 1 if int(os.environ.get("LOCAL_RANK", 0)) == 0 else 2
    result = None
    for p in range(3):
        if p == phase:
            result = fn()
        dist.barrier()
    return result


def _remote_frame(exc: BaseException, path: str | None):
    """The innermost traceback frame of `exc` (or of an exception it was raised from) that runs a model's own code:
    a file under transformers' remote-code cache (HF_MODULES_CACHE/transformers_modules) or under the model folder."""
    from transformers import dynamic_module_utils
    roots = [os.path.realpath(dynamic_module_utils.HF_MODULES_CACHE)] + ([os.path.realpath(path)] if path else [])
    found, seen = None, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for fr in traceback.extract_tb(exc.__traceback__):
            f = os.path.realpath(fr.filename)
            if any(f.startswith(r + os.sep) for r in roots) or f"{os.sep}transformers_modules{os.sep}" in f:
                found = fr
        if found is not None:
            return found
        exc = exc.__cause__ or exc.__context__
    return None


def remote_code_error(path: str | None, exc: Exception) -> UserError | None:
    """One actionable message for a reward model whose own code (trust_remote_code) fails under the installed
    transformers, or that needs a package this environment lacks; None when the failure is not of that kind (then
    the caller re-raises it as it is)."""
    import transformers
    frame = _remote_frame(exc, path)
    what = f"{type(exc).__name__}: {exc}".strip()
    if frame is None:
        if isinstance(exc, ImportError):  # e.g. sentencepiece for InternLM2's tokenizer, einops, ...
            return UserError(f"reward model {path} needs a package this environment lacks: {what} (or pass another "
                             "--reward_model_path)")
        return None
    name, ver = os.path.basename(frame.filename), transformers.__version__
    return UserError(
        f"reward model {path}: its own code ({name}, trust_remote_code) fails under transformers {ver}: {what}\n"
        f"  at {name} line {frame.lineno}: {(frame.line or '').strip()}\n"
        "The model's code was likely written for an older transformers. Fix one of: (1) edit "
        f"{os.path.join(path or '.', name)} line {frame.lineno} to work with transformers {ver} (the folder's code "
        "is copied again on the next run); (2) use a reward model that loads without remote code: an HF "
        "*ForSequenceClassification checkpoint with num_labels 1; (3) a separate environment with the older "
        f"transformers the model was written for (pip install 'transformers<5'; this repo is tested with {ver} only); "
        "(4) --reward_model_path none with --reasoning 1 (format rewards) or a dataset with numeric answers")


@contextlib.contextmanager
def remote_code_guard(path: str | None):
    """Turn a failure inside a reward model's own code into one UserError (see remote_code_error)."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # only re-labelled when the traceback shows the model's own code or a missing package
        err = remote_code_error(path, e)
        if err is None:
            raise
        raise err from None


class RewardScorer:
    """rewards for a batch of completions: format/tag rewards (--reasoning 1), a rule-based checkable reward when the
    dataset answer is checkable (the demo arithmetic prompts: answer string is a number), and a reward model from
    --reward_model_path (HF AutoModelForSequenceClassification, or an InternLM-style model exposing get_score via
    its own trust_remote_code modules), loaded at construction (start-up) from a local directory and tried on one
    small chat, so a model whose code does not work under this transformers stops the run before any training
    (one message naming the failing line, see `remote_code_error`); no reward model -> fine (stated in the log).

    Total reward = format/tag (0..1.5, --reasoning 1) + answer_reward * [final answer == reference number]
                   + reward-model score clipped to [-3, 3].
    With --reasoning 1 and an <answer> block, the reward-model score is 0.4 * score(full reply) + 0.6 *
    score(answer only), as in the reference. `reward_range` gives the bounds of the total (used by SPO).
    `reward_model=` accepts an already built object exposing get_score(tokenizer, chat) (tests, custom scorers).
    """

    def __init__(self, args, tokenizer, device, reward_model=None, reward_tokenizer=None):
        self.tokenizer, self.device = tokenizer, torch.device(device)
        self.reasoning = bool(getattr(args, "reasoning", 0))
        self.answer_weight = float(getattr(args, "answer_reward", 1.0))
        if self.answer_weight < 0:
            raise UserError(f"--answer_reward {self.answer_weight} must be >= 0 (0 turns the answer check off)")
        self.rm, self.rm_tokenizer, self.rm_kind, self.rm_path = None, reward_tokenizer, None, None
        if reward_model is not None:
            if not hasattr(reward_model, "get_score"):
                raise TypeError("reward_model must expose get_score(tokenizer, chat) -> float")
            self.rm, self.rm_kind = reward_model, "get_score"
            source = f"reward model object {type(reward_model).__name__}"
        else:
            path, is_default = resolve_reward_model_path(getattr(args, "reward_model_path", None))
            if path is not None and not os.path.isdir(path):
                if not is_default:
                    raise UserError(f"--reward_model_path {path} does not exist; pass a local reward model "
                                    "directory (e.g. a clone of internlm/internlm2-1_8b-reward or an HF sequence "
                                    "classifier), or --reward_model_path none for rule-based rewards only")
                Logger(f"note: no reward model at the default --reward_model_path {path}; "
                       "training with rule-based rewards only")
                path = None
            self.rm_path = path
            source = f"reward model {path}" if path else "no reward model"
        parts = (["format/tag (--reasoning 1)"] if self.reasoning else []) + \
            ([f"checkable answer x{self.answer_weight:g}"] if self.answer_weight > 0 else [])
        has_rm = self.rm is not None or self.rm_path is not None
        if not parts and not has_rm:
            raise UserError("no reward source: --reasoning 0, --answer_reward 0 and no reward model; enable one")
        Logger("rewards: " + ", ".join(parts + [source]))
        lo = -RM_CLIP if has_rm else 0.0
        hi = (RM_CLIP if has_rm else 0.0) + (FORMAT_REWARD + TAG_REWARD * len(TAGS) if self.reasoning else 0.0) \
            + self.answer_weight
        self.reward_range = (lo, hi)
        if self.rm is None and self.rm_path is not None:
            self._load()

    @property
    def has_reward_model(self) -> bool:
        return self.rm is not None or self.rm_path is not None

    # -- reward model
    def _load(self) -> None:
        path = self.rm_path
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise UserError(f"--reward_model_path {path} has no config.json; expected a local Hugging Face model "
                            "directory")
        with open(cfg_file, encoding="utf-8") as f:
            cfg = json.load(f)
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
        dev = self.device
        dtype = torch.float32 if dev.type != "cuda" else \
            (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        classifier = any(a.endswith("ForSequenceClassification") for a in cfg.get("architectures") or [])

        def load():
            if classifier:
                m = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, local_files_only=True)
            else:
                m = AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=True, local_files_only=True)
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=not classifier, local_files_only=True)
            return m, tok

        with remote_code_guard(path):
            model, tok = _rank0_first(load)
        if not classifier and not hasattr(model, "get_score"):
            raise UserError(f"reward model {path} ({cfg.get('architectures')}) is neither a sequence classifier nor "
                            "exposes get_score(tokenizer, chat)")
        if classifier:
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tok.pad_token_id
            tok.padding_side, tok.truncation_side = "right", "left"  # keep the reply's end, which is scored
        model.to(dev).eval().requires_grad_(False)
        self.rm, self.rm_tokenizer, self.rm_kind = model, tok, "classifier" if classifier else "get_score"
        # Remote code often breaks only when it runs (a cache or mask API that changed): score one tiny chat now,
        # so that happens at start-up rather than after the first rollout.
        self._score_chats([[{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "2"}]])
        Logger(f"loaded reward model {path} ({'sequence classifier' if classifier else 'get_score'}, {dtype})")

    def _render(self, chat: list[dict]) -> str:
        tok = self.rm_tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(chat, tokenize=False)
        return "\n".join(f"{m['role']}: {m['content']}" for m in chat)

    @torch.no_grad()
    def _score_chats(self, chats: list[list[dict]]) -> list[float]:
        if self.rm_kind == "get_score":
            tok = self.rm_tokenizer if self.rm_tokenizer is not None else self.tokenizer
            with remote_code_guard(self.rm_path):
                return [float(self.rm.get_score(tok, chat)) for chat in chats]
        tok, scores = self.rm_tokenizer, []
        limit = min(tok.model_max_length, getattr(self.rm.config, "max_position_embeddings", 4096) or 4096, 8192)
        n_labels = self.rm.config.num_labels
        if n_labels not in (1, 2):
            raise UserError(f"reward classifier {self.rm_path} has {n_labels} labels; expected 1 (a score) or 2 "
                            "(bad/good: the score is logit[1] - logit[0])")
        for s in range(0, len(chats), 8):
            enc = tok([self._render(c) for c in chats[s:s + 8]], return_tensors="pt", padding=True,
                      truncation=True, max_length=limit, add_special_tokens=False).to(self.device)
            logits = self.rm(**enc).logits.float()
            scores += (logits[:, 0] if n_labels == 1 else logits[:, 1] - logits[:, 0]).tolist()
        return scores

    def model_scores(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        chats = [prompt_messages(p) + [{"role": "assistant", "content": c}] for p, c in zip(prompts, completions)]
        full = torch.tensor(self._score_chats(chats), dtype=torch.float32).clamp(-RM_CLIP, RM_CLIP)
        if not self.reasoning:
            return full
        answer_rows = [(i, ANSWER_BLOCK.findall(c)) for i, c in enumerate(completions)]
        answer_rows = [(i, blocks[-1].strip()) for i, blocks in answer_rows if blocks]
        if answer_rows:
            sub = [prompt_messages(prompts[i]) + [{"role": "assistant", "content": a}] for i, a in answer_rows]
            ans = torch.tensor(self._score_chats(sub), dtype=torch.float32).clamp(-RM_CLIP, RM_CLIP)
            for (i, _), a in zip(answer_rows, ans):
                full[i] = 0.4 * full[i] + 0.6 * a
        return full

    # -- all rewards
    def __call__(self, prompts: list[str], completions: list[str], answers: list[str]):
        n = len(completions)
        total = torch.zeros(n, dtype=torch.float32)
        metrics = {}
        if self.reasoning:
            fmt = torch.tensor([format_reward(c) for c in completions], dtype=torch.float32)
            total += fmt
            metrics["reward_format"] = fmt.mean().item()
        if self.answer_weight > 0:
            checks = [answer_reward(c, a) for c, a in zip(completions, answers)]
            # rows without a numeric reference answer score 0 here (nothing to check)
            acc = torch.tensor([c or 0.0 for c in checks], dtype=torch.float32)
            total += self.answer_weight * acc
            metrics["reward_answer"] = acc.mean().item()
        if self.has_reward_model:
            rm = self.model_scores(prompts, completions)
            total += rm
            metrics["reward_model"] = rm.mean().item()
        return total.to(self.device), metrics


def load_rl_dataset(args, tokenizer):
    """The RL prompt dataset of --data_path (RLAIF/SFT JSONL); --skip_bad_lines is passed on where the flag exists."""
    from dataset.lm_dataset import RLAIFDataset
    extra = {"skip_bad_lines": args.skip_bad_lines} if hasattr(args, "skip_bad_lines") else {}
    return RLAIFDataset(args.data_path, tokenizer, max_length=args.max_seq_len, **extra)


def check_reward_source(scorer: RewardScorer, dataset, data_path: str, sample: int = 256) -> None:
    """Stop at start-up when no reward could ever be paid; note how many prompts the rule can check otherwise.

    With a reward model or --reasoning 1 (format/tag rewards) every completion gets a reward signal. Without both,
    only the checkable-answer rule pays, and only on prompts whose reference answer (the last message) is a number:
    up to `sample` answers spread over the file are parsed with parse_number (a few ms), and if none is a number
    every reward of the run would be 0, so this raises a UserError naming the three ways out.
    """
    if scorer.has_reward_model or scorer.reasoning:
        return
    n = len(dataset)
    if n == 0:
        return  # an empty file is reported by the dataset / training loop
    idx = sorted({i * n // min(n, sample) for i in range(min(n, sample))})
    answers = [dataset[i]["answer"] for i in idx]
    checkable = sum(parse_number(a) is not None for a in answers)
    if checkable == 0:
        example = next((a for a in answers if a.strip()), "")[:40]
        raise UserError(
            f"no reward source for {data_path}: no reward model, --reasoning 0 (no format reward), and none of "
            f"{len(idx)} sampled reference answers is a number the rule-based check could compare (e.g. "
            f"{example!r}), so every reward would be 0 for the whole run. Pass --reward_model_path DIR (a local "
            "reward model, e.g. internlm2-1_8b-reward), or --reasoning 1 (format rewards), or a dataset whose last "
            "message is a numeric answer (e.g. dataset/demo/rlaif.jsonl)")
    if checkable < len(idx):
        Logger(f"note: {len(idx) - checkable} of {len(idx)} sampled prompts have no numeric reference answer; "
               "without a reward model they always get reward 0")


# ----------------------------------------------------------------------------------------------------------------
# One rollout batch up to its updates (GRPO and SPO share it; the advantage and its bookkeeping are theirs)

def add_policy_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The GRPO-family objective and the updates per rollout (GRPO, SPO); see trainer/rl_objectives.py."""
    parser.add_argument("--loss_type", type=str, default="dapo", choices=list(LOSS_TYPES),
                        help="策略损失 / policy loss: grpo = per-completion mean then mean (DeepSeekMath; the "
                             "objective before this flag existed); dapo = mean over all tokens of the step (DAPO, "
                             "TRL's default; recommended); dr_grpo = sum / (completions x --max_gen_len) (Dr. GRPO); "
                             "cispo = clipped, detached importance weight x log-prob (MiniMax-M1)")
    parser.add_argument("--importance_sampling_level", type=str, default="token", choices=list(IS_LEVELS),
                        help="重要性权重 / importance ratio per token, or per sequence (GSPO, Zheng et al. 2025: "
                             "exp of the mean token log-ratio; the paper uses --loss_type grpo --epsilon 3e-4 "
                             "--epsilon_high 4e-4 --beta 0)")
    parser.add_argument("--epsilon", type=float, default=0.2,
                        help="比率下裁剪 / lower clip: ratio >= 1 - epsilon (PPO/GRPO: 0.2)")
    parser.add_argument("--epsilon_high", type=float, default=None,
                        help="比率上裁剪 / upper clip: ratio <= 1 + epsilon_high. Default: 0.28 with dapo (DAPO's "
                             "clip-higher), 4.0 with cispo (weight cap 5 as ScaleRL/MiniMind), else = --epsilon")
    parser.add_argument("--mask_truncated_completions", type=str2bool_int, default=0, choices=[0, 1],
                        help="截断样本不计损失 / completions cut at --max_gen_len (no EOS) get no loss (DAPO's "
                             "overlong filtering; recommended 1 when many completions hit the limit)")
    parser.add_argument("--num_iterations", type=int, default=1,
                        help="每批 rollout 的更新轮数 mu / optimizer passes over each rollout batch (GRPO paper's "
                             "mu; TRL default 1). From the 2nd update on the ratio to the rollout policy differs from "
                             "1 and clipping acts; 2 is a good start when generation dominates the step time")
    return parser


def check_policy_args(args) -> None:
    """Resolve --epsilon_high and reject values no objective can use."""
    if args.epsilon_high is None:
        args.epsilon_high = default_epsilon_high(args.loss_type, args.epsilon)
    if not 0 <= args.epsilon < 1 or not args.epsilon_high >= 0:
        raise UserError(f"need 0 <= --epsilon < 1 and --epsilon_high >= 0, got {args.epsilon}, {args.epsilon_high}")
    if args.beta < 0:
        raise UserError(f"--beta {args.beta} must be >= 0 (0 = no KL term and no reference model)")


def describe_objective(args) -> str:
    clip = f"weight <= {1 + args.epsilon_high:g} (detached)" if args.loss_type == "cispo" else \
        f"ratio in [{1 - args.epsilon:g}, {1 + args.epsilon_high:g}]"
    return (f"objective {args.loss_type}, {args.importance_sampling_level}-level ratio, {clip}, beta {args.beta:g}"
            + (", truncated completions masked" if args.mask_truncated_completions else ""))


def reference_policy(model, beta: float):
    """The frozen reference for the KL term, or None with --beta 0 (no copy, no forward: one model less)."""
    if beta == 0:
        Logger("--beta 0: no reference model is built (no KL term; saves one policy's memory and its forward)")
        return None
    return frozen_copy(model)


@dataclass
class RolloutBatch:
    rollout: Rollout
    rewards: torch.Tensor     # [N] on the device
    reward_metrics: dict
    answers: list             # the reference answer of each row


def sample_and_score(model, tokenizer, scorer: RewardScorer, prompts: list, answers: list, args, ctx,
                     num_return_sequences: int) -> RolloutBatch:
    """All prompts x completions in ONE batched generate (the model's fast decode loop), then rewards right away
    (before any training forward holds activations)."""
    with ctx.autocast():
        ro = rollout(model, tokenizer, prompts, num_return_sequences=num_return_sequences,
                     max_new_tokens=args.max_gen_len, max_prompt_len=args.max_seq_len, temperature=args.temperature)
    answers = [a for a in answers for _ in range(num_return_sequences)]
    rewards, reward_metrics = scorer(ro.prompts, ro.completions, answers)
    return RolloutBatch(ro, rewards, reward_metrics, answers)


@torch.no_grad()
def rollout_forward(fn, ro: Rollout, chunks: list, ctx) -> torch.Tensor:
    """[N, R] fp32 of fn(sub-rollout) -> [n, R'] over the rollout's row chunks, without gradient, under the run's
    autocast; padding columns are 0. Forwarded in exactly the chunks the updates use (same rows, same trimmed
    widths), so that with equal weights the values equal the training pass's number for number."""
    out = torch.zeros(ro.completion_ids.shape, dtype=torch.float32, device=ro.input_ids.device)
    for rows in chunks:
        sub = ro.select(rows)
        with ctx.autocast():
            v = fn(sub)
        out[rows.to(out.device), :v.shape[1]] = v.float()
    return out


def frozen_logprobs(model, ro: Rollout, chunks: list, args, ctx) -> torch.Tensor:
    """[N, R] log-probs of the rollout's completions under `model` (pi_old, the reference): ratio 1 and KL 0 when
    the weights equal the policy's (see rollout_forward)."""
    return rollout_forward(lambda sub: completion_logprobs(model, sub, temperature=args.temperature)[0], ro, chunks,
                           ctx)


def loss_mask(ro: Rollout, args) -> torch.Tensor:
    """The completion mask, with truncated completions zeroed under --mask_truncated_completions 1."""
    mask = ro.completion_mask
    if getattr(args, "mask_truncated_completions", 0):
        mask = mask * (~ro.truncated).to(mask.dtype)[:, None]
    return mask


def policy_updates(loop, ro: Rollout, advantages: torch.Tensor, args, ctx, *, ref_model=None,
                   metrics: dict | None = None) -> torch.Tensor:
    """The optimizer steps of one rollout batch with the GRPO-family objective (GRPO, SPO). Returns the rollout
    policy's log-probs [N, R] (detached; SPO's tracker reads them without another forward).

    pi_old: with one optimizer step per rollout batch the rollout policy IS the policy of the update, so
    old_logp = logp.detach() (ratio 1, no extra forward); with several (--num_iterations > 1 or mini-batches) the
    rollout's log-probs are computed once, here, without gradient, and every update's ratio is taken against them.
    The reference log-probs are computed once per rollout batch too (not once per update)."""
    mask = loss_mask(ro, args)
    chunks = loop.rollout_chunks(len(ro.completions))
    old_logp = frozen_logprobs(loop.model, ro, chunks, args, ctx) if loop.steps_per_rollout > 1 else None
    ref_logp = frozen_logprobs(ref_model, ro, chunks, args, ctx) if ref_model is not None else None
    rollout_logp = old_logp if old_logp is not None else torch.zeros(mask.shape, device=mask.device)

    def loss_fn(rows, iteration):
        sub = ro.select(rows)
        R, dev_rows = sub.completion_ids.shape[1], rows.to(advantages.device)
        with ctx.autocast():
            logp, aux = completion_logprobs(loop.model, sub, temperature=args.temperature)
        if old_logp is None:  # one step per rollout: this pass is the rollout policy
            rollout_logp[dev_rows, :R] = logp.detach()
        old = old_logp[dev_rows, :R] if old_logp is not None else logp.detach()
        ref = ref_logp[dev_rows, :R] if ref_logp is not None else None
        loss, stats = policy_objective(logp, old, advantages[dev_rows], mask[dev_rows, :R], loss_type=args.loss_type,
                                       importance_sampling_level=args.importance_sampling_level,
                                       epsilon=args.epsilon, epsilon_high=args.epsilon_high, ref_logp=ref,
                                       beta=args.beta, max_gen_len=args.max_gen_len)
        return loss, dict(stats, aux=aux, num_tokens=sub.num_tokens)

    loop.update(loss_fn, len(ro.completions), row_units=objective_units(mask, args.loss_type, args.max_gen_len),
                metrics=metrics)
    return rollout_logp


# ----------------------------------------------------------------------------------------------------------------
# Group advantages (GRPO and the agent stage)

def group_advantages(rewards: torch.Tensor, num_generations: int, scale: bool = True) -> torch.Tensor:
    """(r - group mean) / (group population std + 1e-4); rows i*G .. i*G+G-1 form prompt i's group.
    scale=False: r - group mean (Dr. GRPO)."""
    groups = rewards.view(-1, num_generations)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, unbiased=False, keepdim=True) + ADV_EPS)
    return centred.view(-1)


def batch_stats(rewards: torch.Tensor, all_reduce=None):
    """(mean, population std) over the rewards of every rank, from one all-reduce of [count, sum, sum of squares]
    in fp64. all_reduce: an in-place sum over ranks (default dist.all_reduce when a process group is up)."""
    r = rewards.detach().double()
    stats = torch.stack([torch.ones_like(r).sum(), r.sum(), (r * r).sum()])
    if all_reduce is None and dist.is_initialized():
        all_reduce = dist.all_reduce
    if all_reduce is not None:
        all_reduce(stats)
    n, total, squares = stats.unbind()
    mean = total / n
    return mean, (squares / n - mean * mean).clamp(min=0).sqrt()


def batch_advantages(rewards: torch.Tensor, all_reduce=None, scale: bool = True):
    """(r - batch mean) / (batch population std + 1e-4) over the completions of every rank: the baseline of a
    group of one (--num_generations 1). Returns (advantages, mean, std), mean and std as 0-dim tensors."""
    mean, std = batch_stats(rewards, all_reduce)
    adv = rewards.detach().double() - mean
    if scale:
        adv = adv / (std + ADV_EPS)
    return adv.to(rewards.dtype), mean.float(), std.float()


def advantages_of(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> tuple[torch.Tensor, dict]:
    """The advantages of a rollout batch and their logged extras (--num_generations, --scale_rewards)."""
    if num_generations == 1:
        adv, mean, std = batch_advantages(rewards, scale=scale_rewards != "none")
        return adv, {"baseline": mean, "baseline_std": std}
    if scale_rewards == "batch":  # group baseline, the whole rollout batch's std (all ranks)
        _, std = batch_stats(rewards)
        return group_advantages(rewards, num_generations, scale=False) / (std.float() + ADV_EPS), {}
    return group_advantages(rewards, num_generations, scale=scale_rewards == "group"), {}


def zero_std_groups(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """[groups] bool: the groups whose rewards are all equal (advantage 0 for every member: no signal)."""
    groups = rewards.view(-1, num_generations)
    return (groups == groups[:, :1]).all(dim=1)


def group_policy_updates(loop, b: RolloutBatch, args, ctx, *, ref_model=None, metrics: dict) -> None:
    """The advantages of a rollout batch's rewards (advantages_of: --num_generations, --scale_rewards), logged with
    their mean and std, then its optimizer steps (policy_updates). GRPO and the agent stage."""
    advantages, adv_extra = advantages_of(b.rewards, args.num_generations, args.scale_rewards)
    metrics.update(adv_extra, advantage_mean=advantages.mean(),
                   advantage_std=advantages.std(unbiased=False) if advantages.numel() > 1 else 0.0)
    policy_updates(loop, b.rollout, advantages, args, ctx, ref_model=ref_model, metrics=metrics)


def rl_metrics(b: RolloutBatch) -> dict:
    """The rollout-level metrics every RL stage logs (the stage adds its advantage statistics, the update the loss
    terms, the loop lr and tokens/s)."""
    n = b.rewards.numel()
    ro = b.rollout
    return dict(reward=b.rewards.mean(), reward_std=b.rewards.std(unbiased=False) if n > 1 else 0.0,
                completion_len=ro.completion_mask.sum(dim=1).mean(), truncated=ro.truncated.float().mean(),
                **b.reward_metrics)


def check_rl_args(args) -> None:
    """Flag values that cannot work, caught before any model is built."""
    if args.max_gen_len < 1:
        raise UserError(f"--max_gen_len {args.max_gen_len} must be >= 1")
    if args.max_seq_len < 8:
        raise UserError(f"--max_seq_len {args.max_seq_len} is the prompt length in RL stages; use >= 8 so the chat "
                        "markup fits")
    if args.temperature < 0 or not math.isfinite(args.temperature):
        raise UserError(f"--temperature {args.temperature} must be >= 0 (0 = greedy)")
