"""Datasets and collate functions for every training stage (MiniMind JSONL formats, read lazily).

    from dataset.lm_dataset import SFTDataset, collate_lm
    ds = SFTDataset("dataset/demo/sft.jsonl", tokenizer, max_length=512)
    loader = DataLoader(ds, batch_size=8, shuffle=True, collate_fn=collate_lm)
    python dataset/lm_dataset.py --pack_report      # real-token fraction of padded vs packed batches

Formats (one JSON object per line; blank lines are skipped):
    pretrain  {"text": str}
    SFT       {"conversations": [{"role": "system"|"user"|"assistant"|"tool", "content": str,
                                  "tool_calls": [...] (assistant, optional), "reasoning_content": str (optional)}],
               "tools" or "functions": [...] (optional; also accepted on a leading system message)}
    DPO       {"chosen": [messages], "rejected": [messages]}
    RLAIF     SFT format; the last message is the (reference) answer, everything before it is the prompt.

Start-up checks. The constructor reads the whole file once: it records each line's byte offset (a compact int64 array,
so multi-GB files stay on disk), parses every line as JSON and checks the record's structure and types for its dataset
class (250-320 MB/s of CPU time on one core: ~5 s for pretrain_hq.jsonl (1.6 GB), ~30 s for sft_512.jsonl (7.5 GB),
so a bad line at 90% of a file is found at start-up, not after hours of training). Rendering through the chat
template is not part of the check (several times slower); it happens per item. Bad lines end the construction with
one DataFormatError listing the first five as file:line and what is wrong, plus their count; with
skip_bad_lines=True (the scripts' --skip_bad_lines 1) they are left out of the index, counted in `skipped_lines` and
reported once. A directory, or a file with no records (left), is an error naming the path. No index cache: the pass
is a few seconds to half a minute once per start, small against a run, and a cache could go stale or need a place to
write beside the user's data.

Samples whose supervised tokens are all cut by max_length add nothing to the loss. Tokenizing a multi-GB file at
start-up is too slow, so the constructor tokenizes a seeded random sample of up to `target_sample` records (1000;
the whole file when smaller, which makes the count exact), prints the count and the estimate for the whole file when
it is not zero, and keeps it in `no_target_sample` = (found, sampled). Every item also carries "supervised" (its
number of target tokens, i.e. labels[1:] != -100), and the collates return it per sequence so the training loop can
log an exact running count.

Pretraining: each item is <|im_start|> + text + <|im_end|> as token ids, but a boundary token is added only when the
text does not already start / end with it (MiniMind's pretrain_hq.jsonl texts carry "<|im_start|>...<|im_end|>"
turns themselves, and doubling them would teach the model a pattern that never occurs at inference).

Loss masks: labels are -100 everywhere except the tokens of each assistant turn's content (including its reasoning
block and tool calls) and the turn's end token <|im_end|>; the header "<|im_start|>assistant\\n" and the "\\n" after
<|im_end|> are not supervised. Spans are found in the rendered string by the ChatML markers and mapped to tokens with
the tokenizer's offset mapping, so any ChatML tokenizer works (--tokenizer_path), not only ours.

Batches: collate_lm / collate_dpo pad each sequence to the batch's longest. collate_packed / collate_dpo_packed
(bind max_len with functools.partial; the scripts' --pack 1) pack the micro-batch's whole sequences into rows of
width <= max_len (best-fit decreasing at the row width that computes the fewest positions), with position_ids
restarting at 0 per sequence (the model then attends within each sequence only) and the first label of every
sequence set to -100, so a packed batch trains exactly like the padded one while computing fewer pad positions.
collate_pretrain_packed (pretraining only) fills rows of exactly max_len: a document that does not fit the rest of a
row may continue in the next one as a segment of its own (split_pack says where and why). Per micro-batch, whole
sequences cannot reach 95% real tokens at batch 16: the last row of each micro-batch is partly empty, and a random
batch of lengths leaves gaps. The length-grouped sampler (trainer SkipBatchSampler, --group_by_length 1) closes the
gap: group_by_length pre-packs chunks of 64 micro-batches by the records' byte lengths (the `lengths` every dataset
exposes, read at start-up for free), so each micro-batch holds samples that fill rows together.

Real tokens / computed positions (python dataset/lm_dataset.py --pack_report: synthetic MiniMind-shaped lengths,
byte-length estimates off by a lognormal factor of sigma 0.1; 640 micro-batches each):
    SFT (sft_512-like), batch 16 / 32   max_len 340: padded 44.9% / 43.4%, packed 91.9% / 95.0%,
                                        grouped + packed 95.2% / 95.8%
                                        max_len 512: padded 36.4% / 32.5%, packed 93.7% / 95.3%,
                                        grouped + packed 95.4% / 95.9%
    pretrain (half cut at 340)          max_len 340: padded 87.5% / 87.4%, packed (split) 96.0% / 97.5%
                                        max_len 512: padded 67.5% / 66.5%, packed (split) 94.9% / 97.1%
Grouping by sorting (--pack 0 --group_by_length 1) gives SFT 84-88% with padding; sorted blocks packed give 92-93%,
hardly better than no grouping, because blocks of look-alike (but mis-estimated) lengths leave a gap in every row;
hence the pre-packing. Estimates off by sigma 0 / 0.05 / 0.2 (--noise): grouped + packed 98.4-99.1% / 96.7-97.0% /
93.9-95.1%.
"""
import argparse
import bisect
import json
import math
import os
import random
from array import array

import torch
from torch.utils.data import Dataset

from model import chat_format
from model.chat_format import ROLES, assistant_spans

# The fast tokenizer's thread pool fights with DataLoader worker processes (and warns after fork).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHOW_BAD = 5  # bad lines quoted in the start-up error
# JSONL bytes per token when no record was tokenized at start-up: chats mixing Chinese, English and markdown, rendered
# with this repo's tokenizer, measured 2.9-3.1 (Chinese-only text ~2.2, English ~2.4, plus the JSON keys)
BYTES_PER_TOKEN = 3.0

DATA_HELP = ("The real datasets are MiniMind's (ModelScope gongjy/minimind_dataset or Hugging Face "
             "jingyaogong/minimind_dataset): pretrain_hq.jsonl, sft_mini_512.jsonl, sft_512.jsonl, dpo.jsonl, "
             "r1_mix_1024.jsonl, rlaif-mini.jsonl, lora_identity.jsonl; download them into dataset/. Small demo sets "
             "in the same formats are in dataset/demo/ (pretrain, sft, dpo, reason, rlaif, lora_identity .jsonl).")


# Leading bytes of compressed files someone may name .jsonl: (what it is, the command that unpacks it to stdout).
# Unpacking on the fly is not offered: records are read by byte offset, and a compressed stream cannot seek.
COMPRESSED = {b"\x1f\x8b": ("gzip-compressed", "gunzip -c"), b"BZh": ("bzip2-compressed", "bunzip2 -c"),
              b"\xfd7zXZ\x00": ("xz-compressed", "unxz -c"), b"\x28\xb5\x2f\xfd": ("zstd-compressed", "zstd -dc"),
              b"PK\x03\x04": ("zip archive", "unzip -p")}


class DataFormatError(ValueError):
    """A data file or JSONL line that does not match the expected record format."""


class BadRecord(Exception):
    """What is wrong with one record; JsonlFile turns it into a DataFormatError with file:line."""


def say(message):
    """Print once per job: the dataset is built on every rank, its start-up notes are shown by rank 0 only."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(message, flush=True)


# ------------------------------------------------------------------------------------------------------------------
# Lazy JSONL access

def parse_error(e):
    """What json.loads(line.decode()) complained about, with the position inside the line."""
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text ({e.reason} at byte {e.start + 1})"
    if isinstance(e, json.JSONDecodeError):  # its own line/column would count the line's trailing newline
        where = "the end of the line" if e.pos >= len(e.doc.rstrip()) else f"character {e.pos + 1}"
        return f"not valid JSON ({e.msg.removesuffix(' at')} at {where})"
    return f"not valid JSON ({'nested too deeply' if isinstance(e, RecursionError) else e})"


class JsonlFile:
    """Random access to the records of a JSONL file. The constructor checks every line once (JSON object + `check`)
    and keeps the byte offsets of the good ones; read() parses one line when asked for."""

    def __init__(self, path, expected, check, skip_bad_lines=False):
        self.path = str(path)
        self.expected = expected  # shown in error messages
        self.check = check  # record -> None, raises BadRecord (a module-level function, so workers can unpickle it)
        if os.path.isdir(self.path):
            inside = sorted(n for n in os.listdir(self.path) if n.endswith(".jsonl"))[:5]
            hint = f" (it holds {', '.join(inside)})" if inside else ""
            raise DataFormatError(f"{self.path} is a directory, not a JSONL file{hint}; pass the .jsonl file itself")
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"Data file not found: {self.path}\n{DATA_HELP}")
        with open(self.path, "rb") as f:
            head = f.read(6)
        packed = next((kind for magic, kind in COMPRESSED.items() if head.startswith(magic)), None)
        if packed:
            raise DataFormatError(f"{self.path} is a {packed[0]} file, not JSONL text (whatever its name says); "
                                  f"unpack it first, e.g. {packed[1]} {self.path} > unpacked.jsonl, and pass that file")
        self.offsets, self.lengths, bad, n_bad, n_lines = self._scan()
        self.skipped = n_bad
        if n_bad and not skip_bad_lines:
            raise DataFormatError(self._bad_report(bad, n_bad, n_lines) + "\nFix or remove these lines, or pass "
                                  "--skip_bad_lines 1 to train without them (they are counted and reported).")
        if not self.offsets:
            what = f"no good line is left after skipping {n_bad} bad ones" if n_bad else \
                "it is empty or holds only blank lines"
            raise DataFormatError(f"{self.path} has no records: {what}; expected one JSON object per line: "
                                  f"{self.expected}")
        if n_bad:
            say("skipped " + self._bad_report(bad, n_bad, n_lines))
        self._handle, self._pid = None, None

    def _scan(self):
        """One pass: offsets and byte lengths of the good lines; the first SHOW_BAD bad ones as (line, what); counts.
        The byte lengths (int32, 4 bytes a record) are the length-grouped sampler's free estimate of token lengths."""
        offsets, lengths, bad, n_bad, n_good = array("q"), array("i"), [], 0, 0
        loads, check = json.loads, self.check
        pos = lineno = 0
        with open(self.path, "rb") as f:
            if f.read(3) == b"\xef\xbb\xbf":  # a UTF-8 byte-order mark (Windows editors): the first record follows it
                pos = 3
            f.seek(pos)
            for lineno, line in enumerate(f, start=1):
                start, pos = pos, pos + len(line)
                if line.isspace():
                    continue
                try:
                    # decode() + loads(str) is ~20% faster than loads(bytes), which sniffs the encoding first
                    record = loads(line.decode())
                    if type(record) is not dict:
                        raise BadRecord(f"a JSON {type(record).__name__}, not an object")
                    check(record)
                    if b"\\ud" in line or b"\\uD" in line:  # rare: only escaped surrogates can be unpaired
                        check_unicode(record)
                except (ValueError, BadRecord, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
                    n_bad += 1
                    if len(bad) < SHOW_BAD:
                        bad.append((lineno, (str(e) if isinstance(e, BadRecord) else parse_error(e))[:300]))
                    if n_good == 0 and n_bad >= 1000:  # the wrong file for this stage: say so without reading GBs
                        raise DataFormatError(self._bad_report(bad, n_bad, lineno) + "\nNone of the first 1000 "
                                              "lines is such a record: is this the right file for this stage?")
                    continue
                n_good += 1
                offsets.append(start)
                lengths.append(min(pos - start, 2**31 - 1))
        return offsets, lengths, bad, n_bad, lineno

    def _bad_report(self, bad, n_bad, n_lines):
        lines = "".join(f"\n  {self.path}:{lineno}: {what}" for lineno, what in bad)
        shown = f"; the first {len(bad)}" if len(bad) < n_bad else ""
        return (f"{n_bad} bad line{'s' if n_bad > 1 else ''} of {n_lines} in {self.path} (each line must be "
                f"{self.expected}){shown}:{lines}")

    def __len__(self):
        return len(self.offsets)

    def __getstate__(self):
        # File handles do not survive pickling into DataLoader workers; each process reopens its own.
        state = self.__dict__.copy()
        state["_handle"], state["_pid"] = None, None
        return state

    def line_number(self, index):
        """1-based line number of record `index`, counted on demand (only error messages need it, so no second
        int64 array is kept for files of millions of lines)."""
        target, pos, newlines = self.offsets[index], 0, 0
        with open(self.path, "rb") as f:
            while pos < target:
                chunk = f.read(min(1 << 24, target - pos))
                if not chunk:
                    break
                newlines += chunk.count(b"\n")
                pos += len(chunk)
        return newlines + 1

    def error(self, index, what):
        return DataFormatError(f"{self.path}:{self.line_number(index)}: {what}; expected {self.expected} "
                               f"— fix or remove the line")

    def read(self, index):
        """The parsed and checked record of `index` (the file may have changed since the start-up check)."""
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = open(self.path, "rb"), os.getpid()
        self._handle.seek(self.offsets[index])
        try:
            record = json.loads(self._handle.readline().decode())
        except (ValueError, RecursionError) as e:
            raise self.error(index, parse_error(e)) from None
        if type(record) is not dict:
            raise self.error(index, f"a JSON {type(record).__name__}, not an object")
        try:
            self.check(record)
            check_unicode(record)
        except BadRecord as e:
            raise self.error(index, str(e)) from None
        return record


# ------------------------------------------------------------------------------------------------------------------
# Record checks (run on every line at start-up: structure and types only, no tokenizer)

MESSAGES_FORMAT = '[{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...]'


def check_unicode(record):
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"); Python decodes it, but no tokenizer can encode it."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRecord("holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff), which no tokenizer can "
                        "encode") from None


def check_messages(messages, field, need_assistant=True):
    if not isinstance(messages, list) or not messages:
        raise BadRecord(f'"{field}" is missing, empty or not a list')
    for k, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise BadRecord(f'{field}[{k}] is not an object')
        role = msg.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise BadRecord(f'{field}[{k}] has role {role!r:.60}, not one of {sorted(ROLES)}')
        content = msg.get("content")
        if content is not None and not isinstance(content, str):
            raise BadRecord(f'{field}[{k}].content is a {type(content).__name__}, not a string')
        if content is None and not (role == "assistant" and msg.get("tool_calls")):
            raise BadRecord(f'{field}[{k}] has no "content"')
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise BadRecord(f'"{field}" has no assistant turn to learn from')


def normalize_messages(messages):
    """The chat format's normalisation (model/chat_format.py), its complaint as this record's error."""
    try:
        return chat_format.normalize_messages(messages)
    except chat_format.ChatFormatError as e:
        raise BadRecord(str(e)) from None


def record_tools(record, messages):
    """Tools from the record ("tools"/"functions") or from a leading system message, as a list or None."""
    tools = record.get("tools") or record.get("functions")
    if tools is None and messages and messages[0].get("role") == "system":
        tools = messages[0].get("tools") or messages[0].get("functions")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError as e:
            raise BadRecord(f'"tools"/"functions" is a string that is not valid JSON ({e})') from None
    if tools is not None and not isinstance(tools, list):
        raise BadRecord('"tools"/"functions" must be a list of function descriptions')
    return tools or None


def check_pretrain(record):
    if not isinstance(record.get("text"), str):
        raise BadRecord('no string field "text"')


def check_conversation(record, field="conversations"):
    messages = record.get(field)
    check_messages(messages, field)
    normalize_messages(messages)
    record_tools(record, messages)


def check_dpo(record):
    check_conversation(record, "chosen")
    check_conversation(record, "rejected")


def check_rlaif(record):
    check_conversation(record)
    messages = record["conversations"]
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise BadRecord("needs at least one prompt message followed by a final assistant message holding the "
                        "reference answer")


# ------------------------------------------------------------------------------------------------------------------
# Rendering and loss masks

def render(tokenizer, messages, tools=None, add_generation_prompt=False):
    try:
        return chat_format.render(tokenizer, messages, tools, add_generation_prompt=add_generation_prompt)
    except chat_format.ChatFormatError as e:
        raise BadRecord(str(e)) from None


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


def num_targets(labels):
    """Tokens that are predicted: a label at position t is the target of position t-1, so labels[0] never is."""
    return int((labels[1:] != -100).sum())


# ------------------------------------------------------------------------------------------------------------------
# Cutting huge records before tokenizing

CUT_SPARE_TOKENS = 16  # tokens' worth of characters kept beyond max_length: a cut changes only the last few tokens


def max_chars(tokenizer, max_length):
    """Characters of one text that can matter for its first max_length tokens, with room to spare: no token covers
    more characters than its vocabulary string is long (byte-level BPE spells each byte as one character, so a
    token's string is at least as long as the text it covers). Texts are cut to this before tokenizing, so one 50 MB
    line costs what a max_length line costs, and the first max_length tokens come out the same (tested)."""
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    return (max_length + CUT_SPARE_TOKENS) * max(longest, 1)


def cut_text(text, limit, keep_tail=False):
    if not isinstance(text, str) or len(text) <= limit:
        return text
    return text[:limit] + text[-limit:] if keep_tail else text[:limit]


def cut_messages(messages, limit, keep_tail=False):
    """Messages whose content (or reasoning_content) is longer than limit characters, cut (copies; others as is).
    keep_tail keeps `limit` characters from each end, for prompts whose middle is dropped when they are too long."""
    if all(len(m.get("content") or "") <= limit and len(m.get("reasoning_content") or "") <= limit
           for m in messages if isinstance(m, dict)):
        return messages
    return [{**m, **{k: cut_text(m[k], limit, keep_tail) for k in ("content", "reasoning_content") if k in m}}
            if isinstance(m, dict) else m for m in messages]


# ------------------------------------------------------------------------------------------------------------------
# Datasets

class JsonlDataset(Dataset):
    """Shared part of the datasets: a checked, lazily read JSONL file, the tokenizer and max_length.

    `lengths` (the records' JSONL byte lengths) divided by `bytes_per_token` estimates each sample's token count
    without tokenizing anything: the length-grouped sampler's input. bytes_per_token is the median over the start-up
    sample's records that max_length did not cut (BYTES_PER_TOKEN when nothing was sampled)."""

    expected = "{...}"  # record format, quoted in error messages
    check = None  # record check (a module-level function)
    sequences = 1  # token sequences per sample (DPO: chosen and rejected)

    def __init__(self, path, tokenizer, max_length, skip_bad_lines=False, target_sample=1000):
        self.file = JsonlFile(path, self.expected, type(self).check, skip_bad_lines)
        self.skipped_lines = self.file.skipped
        self.tokenizer, self.max_length = tokenizer, max_length
        self.max_chars = max_chars(tokenizer, max_length)
        self.bytes_per_token = BYTES_PER_TOKEN
        self.no_target_sample = self.count_no_target(target_sample)

    def __len__(self):
        return len(self.file)

    def __getitem__(self, index):
        record = self.file.read(index)
        try:
            return self.make_item(record)
        except BadRecord as e:
            raise self.file.error(index, str(e)) from None

    @property
    def lengths(self):
        """Byte length of each record's line, an int32 tensor sharing the scan's array (no copy)."""
        return torch.frombuffer(self.file.lengths, dtype=torch.int32)

    def make_item(self, record):
        raise NotImplementedError

    def count_no_target(self, sample_size):
        """(found, sampled): records of a seeded random sample left with no target token by max_length. The same
        sample calibrates bytes_per_token."""
        if not sample_size or not hasattr(self, "targets_of"):
            return None
        picks = random.Random(0).sample(range(len(self)), min(sample_size, len(self)))
        found, ratios = 0, []
        for i in picks:
            item = self[i]
            found += self.targets_of(item) == 0
            seqs = self.seq_lengths(item)
            if 0 < max(seqs) < self.max_length:  # not cut: the line's bytes describe these tokens
                ratios.append(self.file.lengths[i] / sum(seqs))
        if ratios:
            self.bytes_per_token = sorted(ratios)[len(ratios) // 2]
        if found:
            n = len(self)
            share = (f"{found} of the {n} records" if len(picks) == n else
                     f"{found} of {len(picks)} randomly sampled records (~{round(found / len(picks) * n)} of {n})")
            say(f"{self.file.path}: {share} keep no supervised token within max_length={self.max_length} "
                f"(--max_seq_len); they add nothing to the loss. Raise --max_seq_len to train on them.")
        return found, len(picks)

    def render_messages(self, record, field, drop_last=False):
        """record[field] rendered with the chat template (minus the last message for prompts). Texts longer than
        max_chars are cut first (see max_chars); prompts keep their head and tail, as RL's prompt fitting does."""
        messages = cut_messages(record[field], self.max_chars, keep_tail=drop_last)
        tools = record_tools(record, messages)
        return render(self.tokenizer, messages[:-1] if drop_last else messages, tools, add_generation_prompt=drop_last)


class TokenItems:
    """Items of one token sequence with a count of supervised targets (pretrain, SFT): what the start-up check of
    samples with no target reads."""

    @staticmethod
    def targets_of(item):
        return item["supervised"]

    @staticmethod
    def seq_lengths(item):
        return [len(item["input_ids"])]


class PretrainDataset(TokenItems, JsonlDataset):
    """{"text"} lines -> input_ids = <|im_start|> + text ids + <|im_end|> (each boundary token only when the text does
    not already start / end with it; first max_length tokens), labels = input_ids."""

    expected = '{"text": "..."}'
    check = check_pretrain

    def __init__(self, path, tokenizer, max_length=512, skip_bad_lines=False, target_sample=1000):
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        super().__init__(path, tokenizer, max_length, skip_bad_lines, target_sample)

    def make_item(self, record):
        ids = self.tokenizer(record["text"][:self.max_chars], add_special_tokens=False)["input_ids"]
        if ids[:1] != self.bos:
            ids = self.bos + ids
        if ids[-1:] != self.eos:
            ids = ids + self.eos
        ids = torch.tensor(ids[:self.max_length], dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone(), "supervised": max(len(ids) - 1, 0)}


class SFTDataset(TokenItems, JsonlDataset):
    """Conversations rendered with the chat template; only assistant content + <|im_end|> is supervised."""

    expected = '{"conversations": ' + MESSAGES_FORMAT + ', "tools": [...] (optional)}'
    check = check_conversation

    def __init__(self, path, tokenizer, max_length=1024, skip_bad_lines=False, target_sample=1000):
        super().__init__(path, tokenizer, max_length, skip_bad_lines, target_sample)

    def make_item(self, record):
        text = self.render_messages(record, "conversations")
        input_ids, labels = tokenize_with_mask(self.tokenizer, text, self.max_length)
        return {"input_ids": input_ids, "labels": labels, "supervised": num_targets(labels)}


class DPODataset(JsonlDataset):
    """Preference pairs; each side is tokenized and masked like SFT."""

    expected = '{"chosen": ' + MESSAGES_FORMAT + ', "rejected": [...same prompt, another answer]}'
    check = check_dpo
    sequences = 2

    def __init__(self, path, tokenizer, max_length=4096, skip_bad_lines=False, target_sample=1000):
        super().__init__(path, tokenizer, max_length, skip_bad_lines, target_sample)

    def make_item(self, record):
        item = {}
        for side in ("chosen", "rejected"):
            text = self.render_messages(record, side)
            ids, labels = tokenize_with_mask(self.tokenizer, text, self.max_length)
            item[f"{side}_input_ids"], item[f"{side}_labels"] = ids, labels
            item[f"{side}_supervised"] = num_targets(labels)
        return item

    @staticmethod
    def targets_of(item):
        """A pair trains only if both sides keep a target token."""
        return min(item["chosen_supervised"], item["rejected_supervised"])

    @staticmethod
    def seq_lengths(item):
        return [len(item["chosen_input_ids"]), len(item["rejected_input_ids"])]


class RLAIFDataset(JsonlDataset):
    """RL prompts: prompt = chat template over all messages but the last (with the generation prompt), answer =
    the last message's content (a reference answer, or a placeholder for reward-model-only RL). Roles are the
    record's own. max_length is kept for the trainers, which truncate prompts after tokenizing."""

    expected = '{"conversations": [...prompt messages..., {"role": "assistant", "content": "<reference answer>"}]}'
    check = check_rlaif

    def __init__(self, path, tokenizer, max_length=1024, skip_bad_lines=False, target_sample=1000):
        super().__init__(path, tokenizer, max_length, skip_bad_lines, target_sample)

    def make_item(self, record):
        prompt = self.render_messages(record, "conversations", drop_last=True)
        return {"prompt": prompt, "answer": record["conversations"][-1].get("content") or ""}


# ------------------------------------------------------------------------------------------------------------------
# Collate functions: padding

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


def supervised_of(labels):
    return torch.tensor([num_targets(lab) for lab in labels], dtype=torch.long)


def collate_lm(batch, pad_id=0):
    """Right-pad a list of {input_ids, labels} to the batch's longest: ids with pad_id, labels with -100, and the
    attention_mask (1 = real token) that keeps pads out of the MoE balance loss. "supervised" [B]: target tokens
    per sample (0 = everything supervised was cut by max_length)."""
    ids, labels = [b["input_ids"] for b in batch], [b["labels"] for b in batch]
    return {"input_ids": pad_stack(ids, pad_id), "labels": pad_stack(labels, -100),
            "attention_mask": attention_mask_for(ids), "supervised": supervised_of(labels)}


def dpo_sequences(batch):
    """Sequence s of a DPO batch: chosen answers are 0..B-1, rejected ones B..2B-1 (same pair order)."""
    ids = [b["chosen_input_ids"] for b in batch] + [b["rejected_input_ids"] for b in batch]
    labels = [b["chosen_labels"] for b in batch] + [b["rejected_labels"] for b in batch]
    return ids, labels


def collate_dpo(batch, pad_id=0):
    """Rows 0..B-1 are the chosen sequences, rows B..2B-1 the rejected ones (same order), padded together;
    sample_index [2B, L] is the row's sequence number on real tokens and -1 on pads."""
    ids, labels = dpo_sequences(batch)
    mask = attention_mask_for(ids)
    rows = torch.arange(len(ids))[:, None].expand_as(mask)
    return {"input_ids": pad_stack(ids, pad_id), "labels": pad_stack(labels, -100), "attention_mask": mask,
            "sample_index": torch.where(mask.bool(), rows, -1), "supervised": supervised_of(labels)}


def collate_rl(batch):
    return {"prompt": [b["prompt"] for b in batch], "answer": [b["answer"] for b in batch]}


# ------------------------------------------------------------------------------------------------------------------
# Collate functions: packing (use functools.partial(collate_packed, max_len=...) as the DataLoader's collate_fn)

MIN_PIECE = 32  # collate_pretrain_packed splits a document only where both pieces keep this many tokens
GROUP_CHUNK = 64  # length grouping regroups the sampler's order in chunks of GROUP_CHUNK micro-batches
GROUP_FILL = 0.95  # and pre-packs them into rows this full (estimated lengths are noisy: leave some slack)


def best_fit_decreasing(lengths, capacity):
    """Bins of indices with sum(lengths) <= capacity: longest first, each into the fullest bin it still fits
    (ties -> lower index, so the result depends on the input only). O(n log n): the bins' free space is kept sorted."""
    bins, free = [], []  # free: sorted (space left, bin index)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"a sample of {n} tokens does not fit a packed row of {capacity}; the dataset's "
                             f"max_length must not exceed the packing width")
        k = bisect.bisect_left(free, (n, -1))  # the bin with the least room that still fits n
        if k < len(free):
            space, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (space - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
    return bins


def pack_rows(lengths, max_len):
    """(rows, width): best-fit decreasing into the cheapest rows x width, trying row capacities from the longest
    sample up to max_len in steps of 8 and the widths ceil(total / r) that r full rows would have (ties -> the
    narrower rows, whose attention costs less). With many samples of similar length, a capacity below max_len often
    fills every row (e.g. 16 samples of ~110 tokens: 8 rows of 2 at width ~220 instead of 6 rows of 3 at ~340, the
    last one a third full)."""
    longest, total = max(max(lengths), 1), sum(lengths)
    full_rows = {-(-total // r) for r in range(1, len(lengths) + 1)}
    best = None
    for cap in sorted({*range(longest, max_len, 8), max_len, *(w for w in full_rows if longest <= w < max_len)}):
        if best is not None and max(total, -(-total // cap) * longest) >= best[0]:
            continue  # cannot beat the best: at least ceil(total / cap) rows, each at least `longest` wide
        rows = best_fit_decreasing(lengths, cap)
        width = max(sum(lengths[i] for i in r) for r in rows)
        if best is None or len(rows) * width < best[0]:
            best = (len(rows) * width, rows, width)
    return best[1], best[2]


def pack(ids, labels, max_len, pad_id):
    """Sequences packed into rows (see collate_packed); also returns sample_index (sequence number, -1 on pads)."""
    rows, width = pack_rows([len(s) for s in ids], max_len)
    return fill_rows([[(i, 0, len(ids[i])) for i in r] for r in rows], width, ids, labels, pad_id)


def fill_rows(rows, width, ids, labels, pad_id):
    """Tensors for rows of pieces (sequence i, start, end): each piece is a segment (positions from 0, first label
    -100: nothing before it in the row is its context), the rest of a row is padding (a segment of its own).
    "supervised" counts each sequence's targets over its pieces."""
    shape = (len(rows), width)
    out_ids, out_labels = torch.full(shape, pad_id, dtype=torch.long), torch.full(shape, -100, dtype=torch.long)
    mask, positions = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    index = torch.full(shape, -1, dtype=torch.long)
    supervised = [0] * len(ids)
    arange = torch.arange(width)
    for r, pieces in enumerate(rows):
        p = 0
        for i, a, b in pieces:
            n = b - a
            if n == 0:
                continue
            out_ids[r, p:p + n], out_labels[r, p:p + n] = ids[i][a:b], labels[i][a:b]
            out_labels[r, p] = -100  # the previous segment's last token does not predict this one's first
            mask[r, p:p + n], positions[r, p:p + n], index[r, p:p + n] = 1, arange[:n], i
            supervised[i] += num_targets(out_labels[r, p:p + n])
            p += n
        positions[r, p:] = arange[:width - p]  # the padding is a segment of its own
    return {"input_ids": out_ids, "labels": out_labels, "attention_mask": mask, "position_ids": positions,
            "sample_index": index, "supervised": torch.tensor(supervised, dtype=torch.long)}


def collate_packed(batch, max_len, pad_id=0):
    """Pack a micro-batch of {input_ids, labels} into rows of width <= max_len (pack_rows: best-fit decreasing at
    the row width that computes the fewest positions), padded to the longest row. position_ids restart at 0 for every
    sample (and for the padding at a row's end), so the model attends within each sample only; each sample's first
    label is -100 (it is not a target of the sample before it). Targets equal collate_lm's. "supervised" [B] is per
    sample, in batch order."""
    out = pack([b["input_ids"] for b in batch], [b["labels"] for b in batch], max_len, pad_id)
    del out["sample_index"]  # the contract carries it for DPO only; LM losses are per token
    return out


def collate_dpo_packed(batch, max_len, pad_id=0):
    """collate_packed for preference pairs: the 2B sequences (chosen 0..B-1, rejected B..2B-1) are packed together;
    sample_index [R, L] says which sequence each token belongs to (-1 on pads), so per-sequence log-probs are
    sums over sample_index groups. "supervised" [2B] is per sequence."""
    ids, labels = dpo_sequences(batch)
    return pack(ids, labels, max_len, pad_id)


def split_pack(lengths, max_len, min_piece=None):
    """Rows of pieces (document, start, end) for pretraining: every row but the last is exactly max_len full.

    A row takes the longest document that fits its room, again and again (best fit, whole documents first). When
    none fits, the shortest document that leaves both pieces >= min_piece tokens is split: its head ends the row,
    its tail goes back into the pool as a document of its own (nanochat crops documents the same way but drops the
    tail). If no document can be split so, the room stays padding. min_piece None = min(MIN_PIECE, max_len // 8)."""
    if min_piece is None:
        min_piece = min(MIN_PIECE, max(max_len // 8, 1))
    if max(lengths) > max_len:
        raise ValueError(f"a document of {max(lengths)} tokens does not fit a packed row of {max_len}")
    pool = sorted(((n, i, 0) for i, n in enumerate(lengths) if n > 0), key=lambda p: (-p[0], p[1]))
    rows = []
    while pool:
        row, room = [], max_len
        while pool and room:
            k = next((k for k, p in enumerate(pool) if p[0] <= room), None)
            if k is not None:  # the longest piece that fits
                n, i, a = pool.pop(k)
                row.append((i, a, a + n))
                room -= n
                continue
            if room < min_piece:
                break
            k = next((k for k in range(len(pool) - 1, -1, -1) if pool[k][0] - room >= min_piece), None)
            if k is None:
                break
            n, i, a = pool.pop(k)  # the shortest piece that splits into two of >= min_piece
            row.append((i, a, a + room))
            bisect.insort(pool, (n - room, i, a + room), key=lambda p: (-p[0], p[1], p[2]))
            room = 0
        rows.append(row)
    return rows or [[]]  # only empty documents: one empty row


def collate_pretrain_packed(batch, max_len, pad_id=0, min_piece=None):
    """Pretraining documents packed into rows of max_len (split_pack): only the micro-batch's last row is partly
    padding. A document that does not fit the rest of a row may continue in the next row; each piece is its own
    segment (positions from 0, attention within the piece, its first label -100), so the tail piece is predicted
    without the head's context and one target (its first token) is lost per split."""
    ids, labels = [b["input_ids"] for b in batch], [b["labels"] for b in batch]
    rows = split_pack([len(s) for s in ids], max_len, min_piece)
    out = fill_rows(rows, max(sum(b - a for _, a, b in r) for r in rows), ids, labels, pad_id)
    del out["sample_index"]
    return out


def group_by_length(indices, lengths, block, width, rng):
    """One chunk of the sampler's order, regrouped so that each run of `block` consecutive samples batches well.

    indices: the chunk's samples in the seeded order; lengths: their estimated lengths (same unit as width).
    width 0 (padded batches): sorted by length, so a block holds similar lengths. width > 0 (packed batches): the
    chunk is packed into rows of `width` by best-fit decreasing on the estimates and the rows are laid out one after
    another, so a block holds samples that fill rows together. (Sorting makes blocks of look-alike lengths, which
    pack no better than random blocks once lengths are estimates: --pack_report.) The full blocks are shuffled with rng;
    a short last block stays last, so every block of a full chunk starts at a multiple of `block`."""
    if width:
        rows = best_fit_decreasing([min(n, width) for n in lengths], width)
        flat = [indices[j] for r in rows for j in r]
    else:
        flat = [indices[j] for j in sorted(range(len(indices)), key=lambda j: (lengths[j], j))]
    full = len(flat) // block
    blocks = [flat[k * block:(k + 1) * block] for k in range(full)]
    rng.shuffle(blocks)
    return [i for b in blocks for i in b] + flat[full * block:]


# ------------------------------------------------------------------------------------------------------------------
# Packing report: python dataset/lm_dataset.py --pack_report

def synthetic_lengths(kind, n, max_len, rng):
    """MiniMind-shaped token lengths, truncated to max_len as the dataset does. sft (sft_512-like): lognormal with
    median 120 clipped to [16, 512], many short chats and a few long ones. pretrain (pretrain_hq-like: short texts
    merged into lines of up to ~512 characters, ~300-450 tokens): lognormal with median 330 clipped to [16, 512],
    so about half the lines are cut at --max_seq_len 340."""
    median, sigma = {"sft": (120, 0.8), "pretrain": (330, 0.35)}[kind]
    return [min(max(int(rng.lognormvariate(math.log(median), sigma)), 16), 512, max_len) for _ in range(n)]


def real_token_fraction(lengths, batch_size, width, split=False):
    """(padded, packed) real tokens / computed positions over consecutive micro-batches of `lengths`; packed =
    collate_packed's rows (pack_rows, width <= `width`), or collate_pretrain_packed's with split=True."""
    real = padded = packed = 0
    for k in range(0, len(lengths) - batch_size + 1, batch_size):
        chunk = lengths[k:k + batch_size]
        real += sum(chunk)
        padded += batch_size * max(chunk)
        if split:
            rows = split_pack(chunk, width)
            packed += len(rows) * max(sum(b - a for _, a, b in r) for r in rows)
        else:
            rows, w = pack_rows(chunk, width)
            packed += len(rows) * w
    return real / padded, real / packed


def split_share(lengths, batch_size, max_len):
    """Share of the tokens that collate_pretrain_packed puts in a split document's later pieces (they lose the
    context of the pieces before them)."""
    cut = 0
    for k in range(0, len(lengths) - batch_size + 1, batch_size):
        cut += sum(b - a for r in split_pack(lengths[k:k + batch_size], max_len) for _, a, b in r if a > 0)
    return cut / sum(lengths[:len(lengths) // batch_size * batch_size])


def grouped(lengths, estimates, batch_size, width, seed=0):
    """`lengths` in the order the length-grouped sampler yields them to one rank (SkipBatchSampler's chunks, with
    `estimates` in place of the byte lengths and `width` in their unit; 0 = sort by length)."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    chunk, out = GROUP_CHUNK * batch_size, []
    for c in range(0, len(order), chunk):
        part = order[c:c + chunk]
        out += group_by_length(part, [estimates[i] for i in part], batch_size, width, random.Random(c))
    return [lengths[i] for i in out]


def pack_report(lengths=None, estimates=None, label="", batch_sizes=(16, 32), max_lens=(340, 512), batches=640,
                noise=0.1, seed=0):
    """Real tokens / computed positions of padded, packed and length-grouped micro-batches (sorted: --pack 0's
    grouping; grouped: --pack 1's pre-packed grouping), on `lengths` (untruncated
    token lengths of a file's records, `estimates` their byte lengths over the median bytes per token) or on
    synthetic MiniMind-shaped ones whose estimates are off by a lognormal factor (sigma `noise`; chats measured
    0.05-0.1 for bytes vs tokens). Pretraining packs with collate_pretrain_packed (documents may be split: the last
    column is the share of tokens in later pieces), the other stages with collate_packed."""
    source = (f"{len(lengths)} random records of the file" if lengths else
              f"synthetic, length estimates off by sigma {noise}; {batches} micro-batches each")
    print(f"real tokens / computed positions ({source})")
    print("lengths   B  max_len  padded  packed  sorted+padded  sorted+packed  grouped+packed  split pieces")
    for kind in ([label] if lengths else ["pretrain", "sft"]):
        split = kind == "pretrain"
        for max_len in max_lens:
            for b in batch_sizes:
                if lengths:
                    sample, est = [min(n, max_len) for n in lengths], estimates
                else:
                    rng = random.Random(seed)
                    raw = synthetic_lengths(kind, b * batches, 1 << 30, rng)
                    sample = [min(n, max_len) for n in raw]
                    est = [n * math.exp(rng.gauss(0, noise)) for n in raw]
                pad, packed = real_token_fraction(sample, b, max_len, split)
                s_pad, s_packed = real_token_fraction(grouped(sample, est, b, 0), b, max_len, split)
                _, g_packed = real_token_fraction(grouped(sample, est, b, GROUP_FILL * max_len), b, max_len, split)
                cut = f"{split_share(sample, b, max_len):12.1%}" if split else ""
                print(f"{kind:8} {b:3} {max_len:8} {pad:7.1%} {packed:7.1%} {s_pad:14.1%} {s_packed:14.1%} "
                      f"{g_packed:15.1%} {cut}")


def file_lengths(path, kind, tokenizer_path, n=20000, seed=0):
    """(untruncated token lengths, token lengths estimated from the byte lengths as the sampler does) of up to n
    random records of a real file."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    cls = PretrainDataset if kind == "pretrain" else SFTDataset
    ds = cls(path, tokenizer, max_length=1 << 30, target_sample=0)
    picks = random.Random(seed).sample(range(len(ds)), min(n, len(ds)))
    tokens, size = [len(ds[i]["input_ids"]) for i in picks], [int(ds.lengths[i]) for i in picks]
    per_token = sorted(b / max(t, 1) for b, t in zip(size, tokens))[len(tokens) // 2]
    return tokens, [b / per_token for b in size]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Dataset utilities")
    parser.add_argument("--pack_report", action="store_true",
                        help="real-token fraction of padded, packed and length-grouped batches")
    parser.add_argument("--data_path", help="measure on a random sample of this file (default: synthetic lengths)")
    parser.add_argument("--kind", choices=["pretrain", "sft"], default="sft", help="dataset class for --data_path")
    parser.add_argument("--noise", type=float, default=0.1,
                        help="synthetic lengths: sigma of the lognormal error of the byte-length estimates")
    parser.add_argument("--tokenizer_path", default=os.path.join(os.path.dirname(__file__), "..", "model"))
    args = parser.parse_args()
    if args.pack_report:
        lengths, estimates = file_lengths(args.data_path, args.kind, args.tokenizer_path) if args.data_path \
            else (None, None)
        pack_report(lengths, estimates, label=args.kind, noise=args.noise)
