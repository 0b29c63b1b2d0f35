"""The one chat module: what eval_llm.py, the OpenAI-compatible server and the browser page share.

    from trainer.chat_utils import add_model_args, load_model, build_prompt, ChatStream, ReplyParser
    add_model_args(parser)                         # --weight --save_dir --lora_weight --hf_dir sizes...
    model, tokenizer = load_model(args)            # native .pth (+ sidecar, + LoRA merged) or a transformers folder
    prompt = build_prompt(tokenizer, messages, budget=context - max_new_tokens, tools=tools)
    stream = ChatStream(model, tokenizer, prompt.ids, max_new_tokens=256, temperature=0.7, top_p=0.9, stop=["\\n\\n"])
    parser = ReplyParser(tools=bool(tools), in_think=prompt.in_think)
    for delta in stream:                            # text deltas, streamed while model.generate runs in a thread
        for kind, value in parser.feed(delta):      # ("reasoning", str) | ("content", str) | ("tool_call", dict)
            ...
    # then parser.finish(), stream.finish_reason ("stop" | "length"), stream.completion_tokens

Four parts, top to bottom: model selection and loading; prompt building with truncation by tokens; generation as a
streaming iterator (model.generate + a streamer in a thread, cancellable, errors end the stream); parsing of
<think>...</think> and <tool_call>{json}</tool_call> (the chat template's formats), incremental so that a streamed
reply and a whole reply split identically.
"""
from __future__ import annotations

import atexit
import contextlib
import glob
import json
import os
import queue
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from model import chat_format
from model.chat_format import CALL_CLOSE, CALL_OPEN, THINK_CLOSE, THINK_OPEN, message_text
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer.trainer_utils import (ARCH_FLAGS, UserError, check_tokenizer, cpu_has_fast_bf16, load_tokenizer,
                                   load_weights, read_sidecar, root_path, weight_path)

# ----------------------------------------------------------------------------------------------------------------
# Model selection and loading


def add_model_args(p) -> None:
    """The model-selection flags of eval_llm.py, the server and the benchmarks."""
    p.add_argument("--load_from", type=str, default="model",
                   help="'model' = native .pth weights from --save_dir; or a transformers-format model directory")
    p.add_argument("--hf_dir", type=str, default=None,
                   help="transformers 格式目录 / a transformers-format model folder (same as --load_from DIR)")
    p.add_argument("--save_dir", type=str, default="out", help="目录 / where {weight}_{hidden}.pth lives")
    p.add_argument("--weight", type=str, default="full_sft", help="权重名 / weight name (pretrain, full_sft, dpo...)")
    p.add_argument("--lora_weight", type=str, default=None,
                   help="LoRA 名 / out/lora/{name}_{hidden}{_moe}.pth (rank, alpha, targets from its .json)")
    p.add_argument("--tokenizer_path", type=str, default=None, help="tokenizer dir (default: the sidecar's, or model/)")
    p.add_argument("--hidden_size", type=int, default=None, help="default: from the sidecar")
    p.add_argument("--num_hidden_layers", type=int, default=None, help="default: from the sidecar")
    p.add_argument("--use_moe", type=int, default=None, choices=[0, 1], help="default: from the sidecar")
    p.add_argument("--headwise_attn_output_gate", type=int, default=None, choices=[0, 1],
                   help="default: from the sidecar (1 without one)")
    p.add_argument("--inference_rope_scaling", action="store_true", help="YaRN x16 context extension (2048 -> 32k)")


def add_device_arg(p) -> None:
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu / cuda / cuda:1")
    p.add_argument("--dtype", type=str, default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="推理精度 / inference precision. auto: CUDA bf16 weights (fp16 without bf16 support); CPU bf16 "
                        "autocast over fp32 weights where the CPU has native bf16 (AVX512-BF16/AMX: ~1.8x faster "
                        "decoding), else fp32")


def resolve_model_paths(args) -> None:
    """--save_dir's default resolves against the repo root, a typed path against the current directory."""
    args.save_dir = root_path(args.save_dir) if args.save_dir == "out" else str(Path(args.save_dir).resolve())
    if getattr(args, "hf_dir", None):
        args.load_from = args.hf_dir


def is_hf_dir(args) -> bool:
    if args.load_from == "model":
        return False
    if not os.path.isfile(os.path.join(args.load_from, "config.json")):
        raise UserError(f"{args.load_from} is not a transformers model folder (no config.json in it); pass the "
                        "folder scripts/convert_model.py wrote, or drop --load_from/--hf_dir to use --weight")
    return True


def load_model(args):
    """(model, tokenizer) on the CPU in fp32, eval mode not set: a transformers folder (--hf_dir/--load_from DIR) or
    native weights chosen by --weight/--save_dir (sizes from the sidecar), with --lora_weight merged in.
    Sets args.model_name (what the server reports as the model id) and args.model_file (what was loaded)."""
    resolve_model_paths(args)
    return build_hf_model(args) if is_hf_dir(args) else build_native_model(args)


def find_weight(args) -> tuple[str, dict | None]:
    """The weight file for --weight, and its sidecar. Sizes not given on the command line come from the sidecar."""
    if args.hidden_size is not None:
        path = weight_path(args.save_dir, args.weight, args.hidden_size, bool(args.use_moe))
        return path, read_sidecar(path)
    found = sorted(p for p in glob.glob(os.path.join(args.save_dir, f"{args.weight}_*.pth"))
                   if Path(p).stem[len(args.weight) + 1:].split("_")[0].isdigit())
    if args.use_moe is not None:
        found = [p for p in found if p.endswith("_moe.pth") == bool(args.use_moe)]
    if not found:
        raise UserError(f"no {args.save_dir}/{args.weight}_*.pth found; train that stage first or pass --save_dir")
    if len(found) > 1:
        raise UserError(f"several weights match --weight {args.weight}: {', '.join(found)}; "
                        "pick one with --hidden_size (and --use_moe)")
    return found[0], read_sidecar(found[0])


def build_native_model(args):
    path, side = find_weight(args)
    file_cfg = (side or {}).get("model_config") or {}
    cfg = {"hidden_size": 512, "num_hidden_layers": 8, "use_moe": False, "headwise_attn_output_gate": True}
    cfg.update({k: file_cfg[k] for k in cfg if k in file_cfg})
    for key, flag in ARCH_FLAGS.items():
        given = getattr(args, key)
        if given is None:
            continue
        if file_cfg and key in file_cfg and file_cfg[key] != type(file_cfg[key])(given):
            value = int(file_cfg[key]) if isinstance(file_cfg[key], bool) else file_cfg[key]
            raise UserError(f"{flag} {given} contradicts {path} (trained with {key}={file_cfg[key]}); "
                            f"drop the flag or pass {flag} {value}")
        cfg[key] = type(cfg[key])(given)
    extra = {k: file_cfg[k] for k in ("num_attention_heads", "num_key_value_heads", "vocab_size",
                                      "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
                                      "intermediate_size", "rope_theta", "rms_norm_eps", "max_position_embeddings",
                                      "norm_topk_prob") if k in file_cfg}
    config = MiniMindConfig(**cfg, **extra, inference_rope_scaling=args.inference_rope_scaling)
    model = MiniMindForCausalLM(config)
    load_weights(model, path, config)
    if args.lora_weight:
        from model.model_lora import apply_lora_from_file, merge_lora
        apply_lora_from_file(model, weight_path(os.path.join(args.save_dir, "lora"), args.lora_weight,
                                                config.hidden_size, config.use_moe))
        model = merge_lora(model)  # folded into the base in fp32: generation then costs what the base costs
    # a typed --tokenizer_path must exist; the sidecar's may name another machine's folder, then model/ is used
    tok_dir = args.tokenizer_path or (side or {}).get("tokenizer_path") or root_path("model")
    if not args.tokenizer_path and not os.path.isdir(tok_dir):
        tok_dir = root_path("model")
    tokenizer = load_tokenizer(tok_dir)
    check_tokenizer(path, tokenizer, tok_dir)  # weights remember the tokenizer they were trained with
    print(f"loaded {path}" + (f" + LoRA {args.lora_weight}" if args.lora_weight else ""))
    args.model_file = path
    args.model_name = Path(path).stem + (f"+{args.lora_weight}" if args.lora_weight else "")
    return model, tokenizer


def build_hf_model(args):
    from transformers import AutoModelForCausalLM
    if args.lora_weight:
        raise UserError("--lora_weight applies to native weights; merge the LoRA when converting instead "
                        "(scripts/convert_model.py --lora_weight NAME)")
    model = AutoModelForCausalLM.from_pretrained(args.load_from, trust_remote_code=True)
    print(f"loaded {args.load_from}")
    args.model_file = str(Path(args.load_from).resolve())
    args.model_name = Path(args.model_file).name
    return model, load_tokenizer(args.tokenizer_path or args.load_from)


def place_model(model, device: str, dtype: str = "auto"):
    """Eval mode on the device in the precision of --dtype (see add_device_arg). On CUDA the weights are cast; on the
    CPU they stay fp32 and `model.inference_autocast` names the autocast dtype that `inference_context(model)` (used
    by ChatStream and the benchmarks) applies, so the bf16 copies come from autocast's cache during a generation."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} but CUDA is not available; pass --device cpu")
    model = model.to(device).eval()
    model.inference_autocast = None
    if device.startswith("cuda"):
        if dtype == "auto":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        model = model.to(getattr(torch, dtype))
    elif dtype == "float16":
        raise UserError("--dtype float16 is for CUDA; on the CPU pass --dtype bfloat16 or float32")
    elif dtype == "bfloat16" or (dtype == "auto" and cpu_has_fast_bf16()):
        model.inference_autocast = torch.bfloat16
    return model


def inference_context(model):
    """The autocast that place_model chose for this model (a no-op context when none)."""
    dtype = getattr(model, "inference_autocast", None)  # only ever set for the CPU (CUDA casts the weights)
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def precision_name(model) -> str:
    amp = getattr(model, "inference_autocast", None)
    return f"{str(amp)[6:]} autocast over {str(model.dtype)[6:]} weights" if amp else f"{str(model.dtype)[6:]}"


def context_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", None) or 32768)


# ----------------------------------------------------------------------------------------------------------------
# Sampling parameters: one rule set for the CLI flags and the API fields

SAMPLING_RULES = {
    "max_new_tokens": (lambda v: v >= 1, "must be >= 1"),
    # below ~1e-38 the logits / temperature overflow to inf and sampling fails; 1e-3 is already greedy in effect
    "temperature": (lambda v: v == 0 or v >= 1e-3, "must be >= 0 (0 = greedy decoding; otherwise at least 0.001)"),
    "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "top_k": (lambda v: v >= 0, "must be >= 0 (0 = off)"),
    "seed": (lambda v: -2**63 <= v < 2**64, "must be in [-2**63, 2**64) (what torch.manual_seed takes)"),
}


def sampling_flag(name: str, cast=float):
    """An argparse type that enforces SAMPLING_RULES[name] (argparse then prints usage + the message, exit 2)."""
    import argparse
    ok, why = SAMPLING_RULES[name]

    def parse(text):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if cast is int else 'a number'}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{text} {why}")
        return v
    return parse


# ----------------------------------------------------------------------------------------------------------------
# Prompt building: chat template, tools, thinking switch, truncation by tokens


@dataclass
class Prompt:
    ids: list[int]
    text: str
    dropped: int            # whole turns left out (oldest first) to fit the budget
    cut_tokens: int         # tokens cut from the middle of the latest message when even it alone was too long
    in_think: bool          # the prompt ends inside an open <think> (the reply starts with reasoning)


def render(tokenizer, messages, tools=None, enable_thinking=None, raw=False) -> str:
    if raw:  # a pretrained (not chat-tuned) model continues the latest user text, no template, no history
        return tokenizer.bos_token + next((message_text(m.get("content")) or "" for m in reversed(messages)
                                           if m["role"] == "user"), "")
    return chat_format.render(tokenizer, messages, tools, add_generation_prompt=True, enable_thinking=enable_thinking)


def build_prompt(tokenizer, messages, budget: int, tools=None, enable_thinking=None, raw=False) -> Prompt:
    """Render messages with the tokenizer's chat template, at most `budget` tokens long, by the chat format's one
    fitting rule (model/chat_format.py fit_prompt): the oldest turns go first (the history is cut at a user message,
    so it never opens with an orphan answer or tool result), the system prompt always stays; if the system prompt
    and the latest message alone are still too long, the MIDDLE of the latest message is cut by tokens (its start
    and its end, which usually holds the question, stay). A system prompt (+ tools) that alone exceeds the budget is
    a ValueError; chat_format.ChatFormatError when the template cannot render the messages. Raw mode (a pretrained
    model) keeps BOS and cuts the middle of the text the same way."""
    text = render(tokenizer, messages, tools, enable_thinking, raw)
    if raw:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        kept = ids if len(ids) <= budget else ids[:1] + chat_format.cut_middle(ids[1:], budget - 1)
        fitted = chat_format.FittedPrompt(kept, text if kept is ids else tokenizer.decode(kept), 0,
                                          len(ids) - len(kept))
    else:
        fitted = chat_format.fit_prompt(tokenizer, text, budget)
    in_think = fitted.text.rstrip().endswith(THINK_OPEN)
    return Prompt(ids=fitted.ids, text=fitted.text, dropped=fitted.dropped, cut_tokens=fitted.cut_tokens,
                  in_think=in_think)


# ----------------------------------------------------------------------------------------------------------------
# Generation: model.generate in a thread, text deltas out through a queue

GENERATION_LOCK = threading.Lock()  # one model per process: generations run one at a time, in arrival order
_END = object()
_STREAMS: weakref.WeakSet = weakref.WeakSet()  # every ChatStream whose thread may still run (its thread holds it)


def cancel_generations() -> list:
    """Cancel every generation of this process, running or queued (a server shutting down); returns the streams."""
    streams = list(_STREAMS)
    for s in streams:
        s.cancel()
    return streams


@atexit.register
def end_generation_threads(timeout: float = 30.0) -> None:
    """At exit, cancel every generation still running and wait for its thread. A daemon thread that is inside a
    torch op when the interpreter finalizes is killed there and the process aborts ("terminate called without an
    active exception", exit 134); atexit runs before that point, and a cancelled generation stops at its next
    decoding step."""
    try:
        for s in cancel_generations():
            s.join(timeout)
    except KeyboardInterrupt:  # a second Ctrl-C while waiting: leave now
        pass


class GenerationError(RuntimeError):
    """Generation failed inside model.generate; the stream ends with this instead of hanging."""


class _QueueStreamer(BaseStreamer):
    """HF streamer protocol (put/end): token ids go to a queue. The first put is the prompt (HF generate sends it
    first); it is recognised by its content, so a generate that does not send it loses no token."""

    def __init__(self, q: queue.Queue, prompt_ids: list[int]):
        self.q, self.prompt_ids, self.first = q, prompt_ids, True

    def put(self, value):
        ids = value.reshape(-1).tolist()
        if self.first:
            self.first = False
            if ids == self.prompt_ids:
                return
        for i in ids:
            self.q.put(i)

    def end(self):
        pass  # the thread puts the end marker itself, also when generate raises


class _StopWhenSet(StoppingCriteria):
    """Stops generate at the next step once the event is set (client gone, stop string seen, Ctrl-C)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def eos_ids(model, tokenizer) -> list[int]:
    """End of turn: the tokenizer's eos (<|im_end|>) plus whatever the model's generation config lists."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen if isinstance(gen, (list, tuple)) else [gen])
    return sorted(i for i in ids if i is not None)


class ChatStream:
    """Iterate to get the reply's text deltas while model.generate runs in a background thread.

    Sampling: temperature 0 = greedy; top_k 0 = off; seed fixes torch's RNG for this reply. `stop` strings end the
    reply before them (text that might begin a stop string is held back until it is clear). cancel() or closing the
    iterator stops generation at the next decoding step. An exception inside generate ends the iteration with
    GenerationError. After iteration: finish_reason ("stop" | "length" | "cancelled"), completion_tokens, text.
    close() also waits for the thread; threads still running at interpreter exit are ended by
    end_generation_threads (atexit), so no program leaves one inside a torch op."""

    def __init__(self, model, tokenizer, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 0.85,
                 top_p: float = 0.85, top_k: int = 0, seed: int | None = None, stop=(), lock=GENERATION_LOCK):
        self.tokenizer, self.prompt_ids = tokenizer, list(prompt_ids)
        self.max_new_tokens, self.stop = max_new_tokens, [s for s in stop if s]
        self.cancelled = threading.Event()
        self.finish_reason, self.completion_tokens, self.text = None, 0, ""
        self.eos = eos_ids(model, tokenizer)
        self._q: queue.Queue = queue.Queue()
        kw = dict(max_new_tokens=max_new_tokens, eos_token_id=self.eos,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0])
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
        else:  # greedy: the sampling knobs stay out (generate warns when they are set without sampling)
            kw.update(do_sample=False)
        self._thread = threading.Thread(target=self._run, args=(model, kw, seed, lock), daemon=True,
                                        name="chat-generate")
        _STREAMS.add(self)
        self._thread.start()
        self._it = self._deltas()

    def _run(self, model, kw, seed, lock):
        try:
            while not lock.acquire(timeout=0.05):  # queued behind another request; give up if cancelled meanwhile
                if self.cancelled.is_set():
                    return
            try:
                if self.cancelled.is_set():
                    return
                if seed is not None:
                    torch.manual_seed(seed)
                ids = torch.tensor([self.prompt_ids], dtype=torch.long, device=model.device)
                with torch.no_grad(), inference_context(model):  # autocast is per thread: enter it here
                    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   streamer=_QueueStreamer(self._q, self.prompt_ids),
                                   stopping_criteria=StoppingCriteriaList([_StopWhenSet(self.cancelled)]), **kw)
            finally:
                lock.release()
        except BaseException as e:  # noqa: BLE001 -- any failure must reach the consumer, or it would wait forever
            self._q.put(GenerationError(f"generation failed: {type(e).__name__}: {e}"))
        finally:
            self._q.put(_END)

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._it)

    def close(self) -> None:
        """Stop the generation and wait for its thread (at most one decoding step after cancel)."""
        self.cancel()
        self._it.close()
        self._thread.join()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the generation thread to end; True when it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _deltas(self):
        tok, ids = self.tokenizer, []
        prefix, read = 0, 0      # incremental detokenisation window (decode only the last few tokens each step)
        emitted = 0              # characters of self.text already handed out
        longest_stop = max((len(s) for s in self.stop), default=0)
        try:
            done = False
            while not done:
                batch = [self._q.get()]
                while not self._q.empty():  # fell behind: take every waiting token, decode once
                    batch.append(self._q.get())
                for item in batch:
                    if isinstance(item, GenerationError):
                        raise item
                    if item is _END:
                        done = True
                        break
                    ids.append(item)
                if read == len(ids):
                    continue
                before = tok.decode(ids[prefix:read], skip_special_tokens=True)
                after = tok.decode(ids[prefix:], skip_special_tokens=True)
                if len(after) <= len(before) or after.endswith("\ufffd"):
                    continue  # an incomplete UTF-8 character: wait for the next token
                self.text += after[len(before):]
                prefix, read = read, len(ids)
                if self.stop:
                    hit = min((p for p in (self.text.find(s, max(0, emitted - longest_stop)) for s in self.stop)
                               if p >= 0), default=-1)
                    if hit >= 0:
                        self.text = self.text[:hit]
                        self.finish_reason = "stop"
                        self.cancel()
                        break
                safe = len(self.text) - _held_suffix(self.text, self.stop)
                if safe > emitted:
                    yield self.text[emitted:safe]
                    emitted = safe
            if len(self.text) > emitted:
                yield self.text[emitted:]
            self.completion_tokens = len(ids)
            if self.finish_reason is None:
                if self.cancelled.is_set():
                    self.finish_reason = "cancelled"
                elif ids and ids[-1] in self.eos or len(ids) < self.max_new_tokens:
                    self.finish_reason = "stop"
                else:
                    self.finish_reason = "length"
        finally:
            self.completion_tokens = len(ids)
            self.cancel()  # consumer gone (closed, error, stop string): stop the generation thread


def _held_suffix(text: str, tags) -> int:
    """Length of the longest end of `text` that could be the start of one of `tags` (keep it until it is clear)."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


# ----------------------------------------------------------------------------------------------------------------
# Reply parsing: <think>...</think> -> reasoning, <tool_call>{json}</tool_call> -> tool calls


class ReplyParser:
    """Splits a reply into events, fed whole or in arbitrary deltas (tags may be split across deltas):
    ("reasoning", text), ("content", text), ("tool_call", {"name": str, "arguments": json-str}).

    A think block counts at the start of the reply only (or from the start when the prompt already opened it:
    in_think). Tool-call blocks are parsed only when the request had tools; one that is not valid JSON with a
    "name" stays content. Whitespace around sections (the template's newlines) is dropped, so a streamed reply
    and a whole reply give the same texts."""

    def __init__(self, tools: bool = False, in_think: bool = False):
        self.tools = tools
        self.state = "think" if in_think else "start"
        self.buf = ""
        self.fresh = True         # at the start of a section: leading whitespace is dropped
        self.calls = 0
        self.malformed = 0        # <tool_call> blocks that were not a valid call or were cut off (shown as content)

    def feed(self, text: str) -> list:
        self.buf += text
        return self._drain(final=False)

    def finish(self) -> list:
        return self._drain(final=True)

    def _text(self, kind: str, text: str, final: bool, hold: int = 0) -> list:
        """Emit `text` except its last `hold` chars (maybe a tag's start) and its trailing whitespace, which stay in
        buf until more text shows whether they are inside the section; `final` (section or reply ends) drops them."""
        body = text[:len(text) - hold]
        shown = body.rstrip()
        self.buf = "" if final else text[len(shown):]
        if self.fresh:
            shown = shown.lstrip()
        if not shown:
            return []
        self.fresh = False
        return [(kind, shown)]

    def _drain(self, final: bool) -> list:
        out = []
        while True:
            if self.state == "start":
                rest = self.buf.lstrip()
                if rest.startswith(THINK_OPEN):
                    self.buf, self.state, self.fresh = rest[len(THINK_OPEN):], "think", True
                    continue
                if not final and (not rest or THINK_OPEN.startswith(rest)):
                    return out  # could still become <think>
                self.state = "content"
                continue
            if self.state == "think":
                i = self.buf.find(THINK_CLOSE)
                if i < 0:
                    return out + self._text("reasoning", self.buf, final, 0 if final else
                                            _held_suffix(self.buf, [THINK_CLOSE]))
                rest = self.buf[i + len(THINK_CLOSE):]
                out += self._text("reasoning", self.buf[:i], True)
                self.buf, self.state, self.fresh = rest, "content", True
                continue
            if self.state == "content":
                i = self.buf.find(CALL_OPEN) if self.tools else -1
                if i < 0:
                    hold = _held_suffix(self.buf, [CALL_OPEN]) if self.tools and not final else 0
                    return out + self._text("content", self.buf, final, hold)
                before, after = self.buf[:i], self.buf[i:]
                out += self._text("content", before, True)
                self.buf, self.state = after, "call"
                continue
            if self.state == "call":
                j = self.buf.find(CALL_CLOSE)
                if j < 0:
                    if not final:
                        return out
                    self.state = "content"  # cut off (length limit): show what came as text
                    self.tools = False
                    self.malformed += 1
                    continue
                block = self.buf[:j + len(CALL_CLOSE)]
                self.buf, self.state = self.buf[len(block):], "content"
                call = parse_tool_call(block[len(CALL_OPEN):-len(CALL_CLOSE)])
                if call is None:
                    out.append(("content", block))
                    self.fresh = False
                    self.malformed += 1
                else:
                    out.append(("tool_call", call))
                    self.calls += 1
                continue


def parse_tool_call(inner: str) -> dict | None:
    """{"name": ..., "arguments": {...}} (the chat template's format) -> {"name", "arguments" as a JSON string}."""
    try:
        obj = json.loads(inner.strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", {})
    return {"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}


def parse_reply(text: str, tools: bool = False, in_think: bool = False) -> dict:
    """A whole reply -> {"reasoning": str, "content": str, "tool_calls": [{"name", "arguments"}]} (same splitting as
    the streaming parser)."""
    parser = ReplyParser(tools=tools, in_think=in_think)
    events = parser.feed(text) + parser.finish()
    return {"reasoning": "".join(v for k, v in events if k == "reasoning"),
            "content": "".join(v for k, v in events if k == "content"),
            "tool_calls": [v for k, v in events if k == "tool_call"]}
