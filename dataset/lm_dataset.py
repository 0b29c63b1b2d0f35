"""Datasets and collate functions for every training stage (MiniMind JSONL formats, read lazily).

    from dataset.lm_dataset import SFTDataset, collate_lm
    ds = SFTDataset("dataset/demo/sft.jsonl", tokenizer, max_length=512)
    loader = DataLoader(ds, batch_size=8, shuffle=True, collate_fn=collate_lm)

Formats (one JSON object per line; blank lines are skipped):
    pretrain  {"text": str}
    SFT       {"conversations": [{"role": "system"|"user"|"assistant"|"tool", "content": str,
                                  "tool_calls": [...] (assistant, optional), "reasoning_content": str (optional)}],
               "tools" or "functions": [...] (optional; also accepted on a leading system message)}
    DPO       {"chosen": [messages], "rejected": [messages]}
    RLAIF     SFT format; the last message is the (reference) answer, everything before it is the prompt.

A file is scanned once for line offsets (a compact int64 array, so multi-GB files stay on disk) and each line is
parsed in __getitem__. A malformed line raises DataFormatError naming the file and the 1-based line number.

Loss masks: labels are -100 everywhere except the tokens of each assistant turn's content (including its reasoning
block and tool calls) and the turn's end token <|im_end|>; the header "<|im_start|>assistant\\n" and the "\\n" after
<|im_end|> are not supervised. Spans are found in the rendered string by the ChatML markers and mapped to tokens with
the tokenizer's offset mapping, so any ChatML tokenizer works (--tokenizer_path), not only ours.
"""
import json
import os
from array import array

import torch
from jinja2.exceptions import TemplateError
from torch.utils.data import Dataset

# The fast tokenizer's thread pool fights with DataLoader worker processes (and warns after fork).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ASSISTANT_HEADER = "<|im_start|>assistant\n"
TURN_END = "<|im_end|>"
ROLES = {"system", "user", "assistant", "tool"}

DATA_HELP = ("The real datasets are MiniMind's (ModelScope gongjy/minimind_dataset or Hugging Face "
             "jingyaogong/minimind_dataset): pretrain_hq.jsonl, sft_mini_512.jsonl, sft_512.jsonl, dpo.jsonl, "
             "r1_mix_1024.jsonl, rlaif-mini.jsonl, lora_identity.jsonl; download them into dataset/. Small demo sets "
             "in the same formats are in dataset/demo/ (pretrain, sft, dpo, reason, rlaif, lora_identity .jsonl).")


class DataFormatError(ValueError):
    """A JSONL line that does not match the expected record format."""


# ------------------------------------------------------------------------------------------------------------------
# Lazy JSONL access

class JsonlFile:
    """Random access to the non-blank lines of a JSONL file; each line is parsed only when asked for."""

    def __init__(self, path, expected):
        self.path = str(path)
        self.expected = expected  # shown in error messages
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"Data file not found: {self.path}\n{DATA_HELP}")
        self.offsets = array("q")
        self.line_numbers = array("q")
        with open(self.path, "rb") as f:
            pos = 0
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    self.offsets.append(pos)
                    self.line_numbers.append(lineno)
                pos += len(line)
        self._handle, self._pid = None, None

    def __len__(self):
        return len(self.offsets)

    def __getstate__(self):
        # File handles do not survive pickling into DataLoader workers; each process reopens its own.
        state = self.__dict__.copy()
        state["_handle"], state["_pid"] = None, None
        return state

    def error(self, index, what):
        return DataFormatError(f"{self.path}:{self.line_numbers[index]}: {what}; expected {self.expected} "
                               f"— fix or remove the line")

    def read(self, index):
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = open(self.path, "rb"), os.getpid()
        self._handle.seek(self.offsets[index])
        raw = self._handle.readline()
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise self.error(index, f"not valid JSON ({e})") from None
        if not isinstance(record, dict):
            raise self.error(index, f"a JSON {type(record).__name__}, not an object")
        return record


# ------------------------------------------------------------------------------------------------------------------
# Record validation

MESSAGES_FORMAT = '[{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...]'


def check_messages(jf, index, messages, field, need_assistant=True):
    if not isinstance(messages, list) or not messages:
        raise jf.error(index, f'"{field}" is missing, empty or not a list')
    for k, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise jf.error(index, f'{field}[{k}] is not an object')
        if msg.get("role") not in ROLES:
            raise jf.error(index, f'{field}[{k}] has role {msg.get("role")!r}, not one of {sorted(ROLES)}')
        content = msg.get("content")
        if content is not None and not isinstance(content, str):
            raise jf.error(index, f'{field}[{k}].content is a {type(content).__name__}, not a string')
        if content is None and not (msg["role"] == "assistant" and msg.get("tool_calls")):
            raise jf.error(index, f'{field}[{k}] has no "content"')
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise jf.error(index, f'"{field}" has no assistant turn to learn from')


def normalize_messages(jf, index, messages):
    """Copies of the messages with JSON-string tool calls decoded (MiniMind's data stores some as strings)."""
    out = []
    for k, msg in enumerate(messages):
        msg = {key: v for key, v in msg.items() if key not in ("functions", "tools")}
        calls = msg.get("tool_calls")
        if isinstance(calls, str):
            try:
                calls = msg["tool_calls"] = json.loads(calls)
            except json.JSONDecodeError as e:
                raise jf.error(index, f"message {k}: tool_calls is a string that is not valid JSON ({e})") from None
        if calls is not None and not (isinstance(calls, list) and all(isinstance(c, dict) for c in calls)):
            raise jf.error(index, f'message {k}: tool_calls must be a list of {{"name": ..., "arguments": ...}}')
        out.append(msg)
    return out


def record_tools(jf, index, record, messages):
    """Tools from the record ("tools"/"functions") or from a leading system message, as a list or None."""
    tools = record.get("tools") or record.get("functions")
    if tools is None and messages and messages[0].get("role") == "system":
        tools = messages[0].get("tools") or messages[0].get("functions")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise jf.error(index, f'"tools"/"functions" is a string that is not valid JSON ({e})') from None
    if tools is not None and not isinstance(tools, list):
        raise jf.error(index, '"tools"/"functions" must be a list of function descriptions')
    return tools or None


def render(jf, index, tokenizer, messages, tools=None, add_generation_prompt=False):
    try:
        return tokenizer.apply_chat_template(normalize_messages(jf, index, messages), tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise jf.error(index, f"the chat template cannot render it ({e})") from None


def assistant_spans(text):
    """Character spans [start, end) of each assistant turn's content + its <|im_end|> in a rendered ChatML string."""
    spans, pos = [], 0
    while True:
        head = text.find(ASSISTANT_HEADER, pos)
        if head < 0:
            return spans
        start = head + len(ASSISTANT_HEADER)
        end = text.find(TURN_END, start)
        end = len(text) if end < 0 else end + len(TURN_END)
        spans.append((start, end))
        pos = end


def tokenize_with_mask(tokenizer, text, max_length):
    """input_ids and labels for a rendered conversation: labels copy the ids inside assistant spans, else -100."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    spans = assistant_spans(text)
    labels = [-100] * len(ids)
    k = 0
    for i, (tok_start, tok_end) in enumerate(offsets):
        # Supervise every token that overlaps a span: a tokenizer that merges the header's "\n" with the first
        # content characters still learns to produce them. Spans are sorted and offsets never go backwards.
        while k < len(spans) and tok_start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if tok_end > spans[k][0] and tok_end > tok_start:
            labels[i] = ids[i]
    ids, labels = ids[:max_length], labels[:max_length]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


# ------------------------------------------------------------------------------------------------------------------
# Datasets

class JsonlDataset(Dataset):
    """Shared part of the datasets: a lazily read JSONL file, the tokenizer and max_length."""

    expected = "{...}"  # record format, quoted in error messages

    def __init__(self, path, tokenizer, max_length):
        self.file = JsonlFile(path, self.expected)
        self.tokenizer, self.max_length = tokenizer, max_length

    def __len__(self):
        return len(self.file)

    def render_messages(self, index, record, field, drop_last=False):
        """Validate record[field] and render it with the chat template (minus the last message for prompts)."""
        messages = record.get(field)
        check_messages(self.file, index, messages, field)
        tools = record_tools(self.file, index, record, messages)
        if drop_last:
            if len(messages) < 2 or messages[-1]["role"] != "assistant":
                raise self.file.error(index, "needs at least one prompt message followed by a final assistant "
                                             "message holding the reference answer")
            messages = messages[:-1]
        return render(self.file, index, self.tokenizer, messages, tools, add_generation_prompt=drop_last)


class PretrainDataset(JsonlDataset):
    """{"text"} lines -> input_ids = [bos] + text ids + [eos] (first max_length tokens), labels = input_ids."""

    expected = '{"text": "..."}'

    def __init__(self, path, tokenizer, max_length=512):
        super().__init__(path, tokenizer, max_length)
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def __getitem__(self, index):
        text = self.file.read(index).get("text")
        if not isinstance(text, str):
            raise self.file.error(index, 'no string field "text"')
        ids = self.bos + self.tokenizer(text, add_special_tokens=False)["input_ids"] + self.eos
        ids = torch.tensor(ids[:self.max_length], dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone()}


class SFTDataset(JsonlDataset):
    """Conversations rendered with the chat template; only assistant content + <|im_end|> is supervised."""

    expected = '{"conversations": ' + MESSAGES_FORMAT + ', "tools": [...] (optional)}'

    def __init__(self, path, tokenizer, max_length=1024):
        super().__init__(path, tokenizer, max_length)

    def __getitem__(self, index):
        text = self.render_messages(index, self.file.read(index), "conversations")
        input_ids, labels = tokenize_with_mask(self.tokenizer, text, self.max_length)
        return {"input_ids": input_ids, "labels": labels}


class DPODataset(JsonlDataset):
    """Preference pairs; each side is tokenized and masked like SFT."""

    expected = '{"chosen": ' + MESSAGES_FORMAT + ', "rejected": [...same prompt, another answer]}'

    def __init__(self, path, tokenizer, max_length=4096):
        super().__init__(path, tokenizer, max_length)

    def __getitem__(self, index):
        record = self.file.read(index)
        item = {}
        for side in ("chosen", "rejected"):
            text = self.render_messages(index, record, side)
            item[f"{side}_input_ids"], item[f"{side}_labels"] = tokenize_with_mask(self.tokenizer, text,
                                                                                   self.max_length)
        return item


class RLAIFDataset(JsonlDataset):
    """RL prompts: prompt = chat template over all messages but the last (with the generation prompt), answer =
    the last message's content (a reference answer, or a placeholder for reward-model-only RL). Roles are the
    record's own. max_length is kept for the trainers, which truncate prompts after tokenizing."""

    expected = '{"conversations": [...prompt messages..., {"role": "assistant", "content": "<reference answer>"}]}'

    def __init__(self, path, tokenizer, max_length=1024):
        super().__init__(path, tokenizer, max_length)

    def __getitem__(self, index):
        record = self.file.read(index)
        prompt = self.render_messages(index, record, "conversations", drop_last=True)
        return {"prompt": prompt, "answer": record["conversations"][-1].get("content") or ""}


# ------------------------------------------------------------------------------------------------------------------
# Collate functions

def pad_stack(rows, value):
    longest = max(len(r) for r in rows)
    out = torch.full((len(rows), longest), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def attention_mask_for(rows):
    """1 on each row's real tokens, 0 on the right padding pad_stack adds (built from lengths, not from the pad id,
    which may occur in real text)."""
    longest = max(len(r) for r in rows)
    lengths = torch.tensor([len(r) for r in rows])
    return (torch.arange(longest)[None] < lengths[:, None]).long()


def collate_lm(batch, pad_id=0):
    """Right-pad a list of {input_ids, labels} to the batch's longest: ids with pad_id, labels with -100, and the
    attention_mask (1 = real token) that keeps pads out of the MoE balance loss."""
    ids = [b["input_ids"] for b in batch]
    return {"input_ids": pad_stack(ids, pad_id), "labels": pad_stack([b["labels"] for b in batch], -100),
            "attention_mask": attention_mask_for(ids)}


def collate_dpo(batch, pad_id=0):
    """Rows 0..B-1 are the chosen sequences, rows B..2B-1 the rejected ones (same order), padded together."""
    ids = [b["chosen_input_ids"] for b in batch] + [b["rejected_input_ids"] for b in batch]
    labels = [b["chosen_labels"] for b in batch] + [b["rejected_labels"] for b in batch]
    return {"input_ids": pad_stack(ids, pad_id), "labels": pad_stack(labels, -100),
            "attention_mask": attention_mask_for(ids)}


def collate_rl(batch):
    return {"prompt": [b["prompt"] for b in batch], "answer": [b["answer"] for b in batch]}
