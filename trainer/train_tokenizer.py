"""Train the 6400-token byte-level BPE tokenizer and write model/tokenizer.json + model/tokenizer_config.json.

    sudo apt-get install -y fortunes-zh debian-reference-zh-cn manpages-zh fortunes bible-kjv-text   # corpus
    python trainer/train_tokenizer.py                       # -> model/tokenizer.json, model/tokenizer_config.json
    python trainer/train_tokenizer.py --corpus my_text.txt more.jsonl --out_dir /tmp/tok

Corpus: real Chinese and English text that Debian ships (read from /usr/share at build time, never committed: the
licences are GPL/GFDL/BSD), plus the demo datasets in dataset/demo/ and any --corpus files (plain text, or JSONL with
"text" / "conversations" / "chosen" / "rejected" fields). The Chinese sources are used whole; the two large English
ones are capped (fortunes 1 M chars, KJV bible 0.7 M, evenly strided) so they do not drown the Chinese text.

Vocabulary (6400 ids): 0 <|endoftext|> (pad, unk), 1 <|im_start|> (bos), 2 <|im_end|> (eos); then the tag tokens
<think> </think> <answer> </answer> <tool_call> </tool_call> <tool_response> </tool_response> at ids 3..10, which are
single tokens but NOT special (decode(..., skip_special_tokens=True) keeps them); then 256 byte symbols and merges.
No normalizer, no post-processor: encode() adds no BOS/EOS, the datasets add them explicitly.

Chat template: model/chat_format.py (CHAT_TEMPLATE, described there), the one owner of the chat format; this script
writes it into tokenizer_config.json.
"""
import argparse
import glob
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.chat_format import CHAT_TEMPLATE, SPECIAL_TOKENS, TAG_TOKENS  # noqa: E402

ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


# ------------------------------------------------------------------------------------------------------------------
# Corpus readers: each returns a list of documents (strings) or [] when the source is not installed.

def read_text(path):
    raw = Path(path).read_bytes()
    if str(path).endswith(".gz"):
        raw = gzip.decompress(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # A few old English fortune files are Latin-1.
        return raw.decode("latin-1")


def fortune_entries(path):
    text = ANSI_RE.sub("", read_text(path))
    return [e.strip() for e in re.split(r"^%\s*$", text, flags=re.M) if e.strip()]


FORTUNE_DIR = "/usr/share/games/fortunes"
ZH_FORTUNES = ["chinese", "tang300", "song100"]


def fortunes_zh():
    files = [os.path.join(FORTUNE_DIR, n) for n in ZH_FORTUNES if os.path.isfile(os.path.join(FORTUNE_DIR, n))]
    return files, [e for f in files for e in fortune_entries(f)]


def fortunes_en():
    files = sorted(p for p in glob.glob(os.path.join(FORTUNE_DIR, "*"))
                   if os.path.isfile(p) and not os.path.islink(p) and "." not in os.path.basename(p)
                   and os.path.basename(p) not in ZH_FORTUNES)
    return files, [e for f in files for e in fortune_entries(f)]


def debian_reference_zh():
    path = "/usr/share/debian-reference/debian-reference.zh-cn.txt.gz"
    if not os.path.isfile(path):
        return [], []
    # Paragraphs as documents; the many blank-line-separated blocks keep BPE words local.
    return [path], [p.strip() for p in re.split(r"\n\s*\n", read_text(path)) if p.strip()]


ROFF_TEXT_MACROS = {"SH", "SS", "B", "I", "BR", "IR", "RB", "BI", "IB", "RI", "IP", "TP", "TH", "Nm", "Nd"}


def strip_roff(text):
    """Keep the human text of a man page: drop comments/requests, keep arguments of font/section macros."""
    out = []
    for line in text.splitlines():
        if line.startswith((".\\\"", "'\\\"", '.\\"')):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].strip().split(None, 1)
            if not parts or parts[0] not in ROFF_TEXT_MACROS or len(parts) < 2:
                continue
            if parts[0] == "TH":
                continue
            line = parts[1].replace('"', "")
        line = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", line)          # font changes \fB \fI \fP \f(CW
        line = re.sub(r"\\\((em|en|hy)", "-", line)
        line = re.sub(r"\\\(\w\w", "", line)                         # other named glyphs
        line = re.sub(r"\\[-e]", lambda m: "-" if m.group(0) == "\\-" else "\\", line)
        line = re.sub(r"\\[&,/|^ ]", lambda m: " " if m.group(0) == "\\ " else "", line)
        line = re.sub(r"\\s[-+]?\d", "", line)                       # size changes
        line = line.strip()
        if line:
            out.append(line)
    return "\n".join(out)


def manpages_zh():
    files = sorted(p for p in glob.glob("/usr/share/man/zh_CN/man*/*.gz") if not os.path.islink(p))
    docs = [strip_roff(read_text(f)) for f in files]
    return files, [d for d in docs if d]


def bible_kjv():
    # bible-kjv-text ships a compressed database; the `bible` reader from bible-kjv (pulled in with it) prints it.
    data = "/usr/lib/bible.data"
    exe = shutil.which("bible")
    if not (os.path.isfile(data) and exe):
        return [], []
    text = subprocess.run([exe, "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True,
                          stdin=subprocess.DEVNULL).stdout
    # One chapter per document; strip the leading verse numbers.
    chapters = [re.sub(r"^\s*\d+\s+", "", c, flags=re.M).strip() for c in re.split(r"\n\s*\n", text)]
    return [data], [c for c in chapters if len(c) > 40]


def jsonl_texts(path):
    """All human text in a JSONL file of MiniMind format (text / conversations / chosen / rejected)."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            if isinstance(rec.get("text"), str):
                docs.append(rec["text"])
            for key in ("conversations", "chosen", "rejected"):
                for msg in rec.get(key) or []:
                    for field in ("content", "reasoning_content"):
                        if isinstance(msg.get(field), str) and msg[field]:
                            docs.append(msg[field])
    return docs


def demo_data():
    files = sorted(glob.glob(str(ROOT / "dataset" / "demo" / "*.jsonl")))
    return files, [d for f in files for d in jsonl_texts(f)]


def extra_corpus(paths):
    files, docs = [], []
    for p in paths:
        if not os.path.isfile(p):
            sys.exit(f"--corpus file not found: {p}")
        files.append(p)
        if p.endswith(".jsonl"):
            docs += jsonl_texts(p)
        else:
            docs += [d.strip() for d in re.split(r"\n\s*\n", read_text(p)) if d.strip()]
    return files, docs


def cap_documents(docs, max_chars):
    """Evenly strided subset of docs with about max_chars characters (whole source when it is smaller)."""
    total = sum(len(d) for d in docs)
    if max_chars <= 0 or total <= max_chars:
        return docs
    stride = total / max_chars
    kept, acc = [], 0.0
    for i, d in enumerate(docs):
        acc += 1.0
        if acc >= stride:
            acc -= stride
            kept.append(d)
    return kept


# ------------------------------------------------------------------------------------------------------------------

def build_tokenizer(docs, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Tags go in as trainer "special" tokens only to pin their ids (3..10) and keep them out of the merges; they are
    # flipped to non-special below so skip_special_tokens keeps them.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + TAG_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))

    spec = json.loads(tok.to_str())
    for entry in spec["added_tokens"]:
        entry["normalized"] = False
        entry["special"] = entry["content"] in SPECIAL_TOKENS
    tok = Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    for i, t in enumerate(SPECIAL_TOKENS + TAG_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    if tok.get_vocab_size() < vocab_size:
        print(f"warning: the corpus only supports {tok.get_vocab_size()} tokens, fewer than --vocab_size {vocab_size}")
    return tok


def tokenizer_config():
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": t in SPECIAL_TOKENS}
               for i, t in enumerate(SPECIAL_TOKENS + TAG_TOKENS)}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": decoder,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def main():
    parser = argparse.ArgumentParser(description="训练分词器 / train the byte-level BPE tokenizer")
    parser.add_argument("--corpus", nargs="*", default=[], help="额外语料 / extra corpus files (.txt or MiniMind .jsonl)")
    parser.add_argument("--vocab_size", type=int, default=6400, help="词表大小 / vocabulary size incl. special tokens")
    parser.add_argument("--out_dir", default=str(ROOT / "model"), help="输出目录 / where tokenizer files go")
    parser.add_argument("--max_chars_per_source", type=int, default=None,
                        help="每个来源最多字符数 / cap every source at this many chars (0 = no cap; default: "
                             "Chinese sources whole, English fortunes 1M, bible 0.7M)")
    parser.add_argument("--no_system_corpus", action="store_true",
                        help="不读取 Debian 语料 / use only the demo data and --corpus files")
    args = parser.parse_args()

    # (name, reader, default cap in chars; 0 = whole source)
    sources = [("demo data (dataset/demo)", demo_data, 0), ("--corpus", lambda: extra_corpus(args.corpus), 0)]
    if not args.no_system_corpus:
        sources = [("fortunes-zh", fortunes_zh, 0), ("debian-reference-zh-cn", debian_reference_zh, 0),
                   ("manpages-zh (zh_CN)", manpages_zh, 0), ("fortunes (English)", fortunes_en, 1_000_000),
                   ("bible-kjv-text", bible_kjv, 700_000)] + sources
    docs, stats = [], []
    for name, reader, cap in sources:
        files, source_docs = reader()
        n_all = sum(len(d) for d in source_docs)
        cap = cap if args.max_chars_per_source is None else args.max_chars_per_source
        source_docs = cap_documents(source_docs, cap)
        n_used = sum(len(d) for d in source_docs)
        stats.append((name, len(files), n_all, n_used))
        docs += source_docs
        where = f"{len(files)} files, e.g. {files[0]}" if files else ("none given" if name == "--corpus" else "not found")
        print(f"  {name:28s} {where}; {n_all:,} chars, using {n_used:,}")
    total = sum(s[3] for s in stats)
    if total == 0:
        sys.exit("No corpus text found. Install the Debian sources (apt-get install -y fortunes-zh "
                 "debian-reference-zh-cn manpages-zh fortunes bible-kjv-text), run dataset/demo/make_demo.py, "
                 "or pass --corpus FILE...")
    cjk = sum(1 for d in docs for ch in d if "\u4e00" <= ch <= "\u9fff")
    print(f"corpus: {len(docs):,} documents, {total:,} chars ({cjk / total:.0%} CJK ideographs)")

    t0 = time.time()
    tok = build_tokenizer(docs, args.vocab_size)
    print(f"trained vocab {tok.get_vocab_size()} in {time.time() - t0:.1f} s")

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(), f, ensure_ascii=False, indent=2)
        f.write("\n")
    print(f"wrote {out / 'tokenizer.json'} and {out / 'tokenizer_config.json'}")
    check(out)


def check(out):
    """Load through transformers like the trainers do and show a round trip and a rendered chat."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    text = "你好，MiniMind! 3+4=7。<think>\n想一想\n</think>\n<answer>\n7\n</answer>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text, "decode(encode(x)) != x"
    chat = tok.apply_chat_template([{"role": "user", "content": "你是谁？"},
                                    {"role": "assistant", "content": "我是 MiniMind。"}], tokenize=False)
    print(f"len(tokenizer) = {len(tok)}; {len(text)} chars -> {len(ids)} tokens; round trip ok")
    print("chat template sample:\n" + chat)


if __name__ == "__main__":
    main()
