"""Convert MiniMind weights between the native format (.pth + sidecar JSON) and transformers folders.

    python scripts/convert_model.py --weight full_sft --format hf --out MiniMind-hf          # any model (MoE, gate)
    python scripts/convert_model.py --weight full_sft --format llama --out MiniMind-llama    # dense, gate off only
    python scripts/convert_model.py --weight full_sft --format gguf --out MiniMind.gguf      # llama.cpp, gate off
    python scripts/convert_model.py --weight full_sft --lora_weight lora_identity --out MiniMind-identity
    python scripts/convert_model.py --from_hf MiniMind-hf --save_weight full_sft_hf          # -> out/full_sft_hf_*.pth

Export (native -> folder). The model is picked exactly as eval_llm.py picks it (--weight/--save_dir/--lora_weight,
sizes and flags from the sidecar JSON beside the .pth; a LoRA is merged into the base first). The folder holds
model.safetensors, config.json, generation_config.json (eos_token_id includes <|im_end|>, so generate/vLLM stop at
the end of a turn) and the tokenizer files (tokenizer.json, tokenizer_config.json with the chat template inline).
  --format hf     config.json has model_type "minimind" and an auto_map; model/model_minimind.py is copied beside it,
                  so AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) loads any MiniMind model.
  --format llama  a plain LlamaForCausalLM folder without remote code (llama.cpp, vLLM, ollama read it). Only a dense
                  model with the attention output gate off has a Llama equivalent; MoE or gated models are refused.
                  --inference_rope_scaling is written as Llama's rope_scaling {"rope_type": "yarn", ...} with
                  MiniMind's numbers (factor 16 over 2048 positions, attention_factor 1.0).
  --format gguf   one GGUF file for llama.cpp / ollama / LM Studio (--dtype fp32|fp16|bf16|q8_0): dense models as
                  llama.cpp's `llama` architecture, MoE with shared experts as `bailingmoe` (the same layer); gated
                  models and --inference_rope_scaling are refused (docs/deploy.md). The hf folder runs in vLLM.
Import (folder -> native): a folder written by this tool, or any transformers folder of model_type minimind or llama
that fits MiniMind (dense Llama: no biases, SiLU, tied embeddings), -> {save_dir}/{save_weight}_{hidden}{_moe}.pth in
fp16 (MiniMind's convention) + sidecar JSON. The folder's code is never executed: our own classes read it.

--out is a new folder, an empty one, or an earlier export: each export writes MARKER (the files it wrote), and only
files listed there are ever replaced or deleted. Another non-empty folder needs --overwrite (files of the export's
names are replaced, nothing else is deleted); the repo root and its source folders are always refused.

Both ways the tensors are checked strictly (every key present, no extras, equal shapes) and the result is verified:
the written model is loaded back (export: through transformers; import: the way eval_llm.py loads it) and its logits
are compared with the source on a probe sequence (--verify 0 skips this).

Lossless: native fp16 -> folder in fp16 or fp32 -> native gives bit-identical tensors. bf16 rounds fp16 weights
(3 fewer mantissa bits), so a bf16 round trip is not bit-identical. Tied weights are stored the transformers way:
lm_head.weight is left out of the safetensors file and config.json says tie_word_embeddings=true.
"""
import argparse
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model.model_minimind import YARN, MiniMindConfig, MiniMindForCausalLM  # noqa: E402
from trainer.chat_utils import add_model_args, is_hf_dir, load_model, resolve_model_paths  # noqa: E402
from trainer.trainer_utils import UserError, run_main, save_weights, sidecar_path, weight_path  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODEL_FILE = ROOT / "model" / "model_minimind.py"
TIED_KEY, EMBED_KEY = "lm_head.weight", "model.embed_tokens.weight"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# written into every export: names the files this tool wrote, the only ones a later export may replace or delete
MARKER = "minimind_export.json"
# the repo's own folders: never an --out (nor anything inside them), and neither is the repo root
SOURCE_FOLDERS = ("model", "trainer", "dataset", "util", "scripts", "tests", "docs", ".git", ".ci")
# config.json entries that describe the file, not the model (dropped when building MiniMindConfig from it)
FILE_KEYS = {"auto_map", "architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
             "model_type", "rope_parameters", "rope_scaling"}


# --------------------------------------------------------------------------------------------------------------------
# Strict checks


def check_tensors(got: dict, expected: dict, what: str, fix: str) -> None:
    """Every expected key present, no extras, equal shapes; otherwise one message naming the keys."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    shapes = [f"{k} {tuple(got[k].shape)} (expected {tuple(expected[k].shape)})"
              for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]
    if missing or extra or shapes:
        parts = [f"missing {len(missing)}: {missing[:4]}" if missing else "",
                 f"unexpected {len(extra)}: {extra[:4]}" if extra else "",
                 f"wrong shapes: {shapes[:3]}" if shapes else ""]
        raise UserError(f"{what}: the tensors do not fit the model ({'; '.join(p for p in parts if p)}). {fix}")


def expected_tensors(model_cls, config) -> dict:
    """The state_dict a model of this class and config must have (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        return model_cls(config).state_dict()


def is_tied(model) -> bool:
    return model.lm_head.weight is model.model.embed_tokens.weight


# --------------------------------------------------------------------------------------------------------------------
# Export: native model -> transformers folder


def llama_refusal(config) -> str | None:
    """Why this MiniMind config has no LlamaForCausalLM equivalent (None if it has one)."""
    why = []
    if config.use_moe:
        why.append("it is MoE (use_moe=1), and Llama's FFN is one dense SwiGLU, with no router or experts")
    if config.headwise_attn_output_gate:
        why.append("it has the head-wise attention output gate (headwise_attn_output_gate=1), and Llama's "
                   "attention has no gate on its output (q_proj would also have the wrong shape)")
    if not why:
        return None
    return ("--format llama cannot represent this model: " + "; ".join(why) + ". Use --format hf (the same "
            "folder layout with the MiniMind model code beside it, loaded with trust_remote_code=True), or train a "
            "dense model with --use_moe 0 --headwise_attn_output_gate 0 for Llama runtimes.")


def minimind_rope_scaling(config) -> dict | None:
    """MiniMind's YaRN as Llama's rope_scaling, or None. MiniMind applies it only when max_position_embeddings
    exceeds the 2048 trained positions; transformers' YaRN always applies, so the condition is checked here."""
    if not config.inference_rope_scaling or config.max_position_embeddings <= YARN["original_max_position_embeddings"]:
        return None
    return {"rope_type": "yarn", "factor": float(YARN["factor"]), "beta_fast": float(YARN["beta_fast"]),
            "beta_slow": float(YARN["beta_slow"]), "attention_factor": float(YARN["attention_factor"]),
            "original_max_position_embeddings": YARN["original_max_position_embeddings"]}


def llama_config_for(config, tokenizer_ids: dict):
    from transformers import LlamaConfig
    scaling = minimind_rope_scaling(config)
    rope = {"rope_type": "default", "rope_theta": float(config.rope_theta)} if scaling is None \
        else {**scaling, "rope_theta": float(config.rope_theta)}
    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.hidden_size // config.num_attention_heads,
        hidden_act="silu", max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_parameters=rope, tie_word_embeddings=True, attention_bias=False, mlp_bias=False, **tokenizer_ids,
    )


def config_json(config, fmt: str, dtype: torch.dtype, tokenizer_ids: dict) -> tuple[dict, object]:
    """(config.json contents, the transformers config the target class is built from)."""
    if fmt == "llama":
        target = llama_config_for(config, tokenizer_ids)
        d = target.to_dict()
        d["architectures"] = ["LlamaForCausalLM"]
        # transformers 4.x, vLLM and llama.cpp's converter read these top-level names; transformers 5 reads both
        d["rope_theta"] = float(config.rope_theta)
        if minimind_rope_scaling(config):
            d["rope_scaling"] = minimind_rope_scaling(config)
    else:
        target = MiniMindConfig(**{k: v for k, v in config.to_dict().items() if k not in FILE_KEYS})
        target.pad_token_id = tokenizer_ids["pad_token_id"]
        d = target.to_dict()
        d["architectures"] = ["MiniMindForCausalLM"]
        # AutoModel (the base model) is what vLLM's Transformers modeling backend builds
        d["auto_map"] = {"AutoConfig": "model_minimind.MiniMindConfig", "AutoModel": "model_minimind.MiniMindModel",
                         "AutoModelForCausalLM": "model_minimind.MiniMindForCausalLM"}
    d["dtype"] = d["torch_dtype"] = str(dtype).removeprefix("torch.")  # "torch_dtype" for transformers 4.x readers
    return d, target


def export_tensors(model, dtype: torch.dtype, expected: dict) -> dict:
    """The model's tensors in `dtype`, without the tied lm_head (safetensors cannot hold a tensor twice; transformers
    leaves the tied key out and re-ties it on load), checked against the target class's state_dict."""
    sd = model.state_dict()
    if is_tied(model):
        sd.pop(TIED_KEY)
        expected = {k: v for k, v in expected.items() if k != TIED_KEY}
    check_tensors(sd, expected, "export", "This is a bug in the converter: the target class changed its layout.")
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in sd.items()}


def special_ids(tokenizer) -> dict:
    """bos/eos/pad ids for config.json and generation_config.json; eos must include <|im_end|> (end of a turn)."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if im_end is None or im_end == tokenizer.unk_token_id:
        raise UserError(f"the tokenizer at {tokenizer.name_or_path} has no <|im_end|> token, so generate() could "
                        "not stop at the end of a turn; pass --tokenizer_path with MiniMind's ChatML tokenizer")
    eos = [im_end] + [i for i in [tokenizer.eos_token_id] if i is not None and i != im_end]
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id}


def write_tokenizer(tokenizer, out: Path) -> None:
    """Copy the tokenizer files as they are (transformers 5's save_pretrained would write tokenizer_class
    "TokenizersBackend", which transformers 4.x and vLLM do not know, and move the chat template out of
    tokenizer_config.json into chat_template.jinja, which older readers ignore)."""
    src = Path(tokenizer.name_or_path)
    if not (src / "tokenizer.json").exists() or not (src / "tokenizer_config.json").exists():
        raise UserError(f"tokenizer folder {src} has no tokenizer.json/tokenizer_config.json to copy; "
                        "pass --tokenizer_path DIR")
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, out / name)
    cfg = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    if not cfg.get("chat_template") and (src / "chat_template.jinja").exists():
        cfg["chat_template"] = (src / "chat_template.jinja").read_text(encoding="utf-8")
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    if not cfg.get("chat_template"):
        raise UserError(f"tokenizer folder {src} has no chat template; pass --tokenizer_path with MiniMind's tokenizer")


def write_model_code(out: Path) -> list[str]:
    """model/model_minimind.py (and any module it imports relatively) copied at export time, for trust_remote_code."""
    from transformers.dynamic_module_utils import get_relative_import_files
    files = [MODEL_FILE, *map(Path, get_relative_import_files(str(MODEL_FILE)))]
    for f in files:
        shutil.copyfile(f, out / f.name)
    return [f.name for f in files]


def prepare_out(out: Path, overwrite: bool = False) -> list[str]:
    """Check --out before anything is loaded or written; returns the files an earlier export of this tool left
    there (its marker's list: the only files a new export may delete).

    Never the repo's own source folders. An existing folder must be empty or one of this tool's exports (it holds
    MARKER); any other folder is refused unless `overwrite`, which lets the export replace files of the export's
    own names in it and never deletes anything else."""
    protected = [ROOT / name for name in SOURCE_FOLDERS]
    if out == ROOT or any(out == p or p in out.parents for p in protected):
        raise UserError(f"--out {out} is part of this repository's source (the repo root or one of "
                        f"{', '.join(SOURCE_FOLDERS)}); export to a new folder, e.g. --out MiniMind-hf")
    if not out.exists():
        return []
    if not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder path")
    marker = out / MARKER
    if marker.is_file():
        try:
            listed = json.loads(marker.read_text(encoding="utf-8"))["files"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{marker} is damaged ({type(e).__name__}); delete it, or export to a new folder") from None
        # a marker names plain files beside it; anything else (a path, a folder) was not written by this tool
        return [f for f in listed if isinstance(f, str) and Path(f).name == f and (out / f).is_file()]
    if any(out.iterdir()) and not overwrite:
        names = sorted(p.name for p in out.iterdir())
        raise UserError(f"--out {out} is not an export of this tool (no {MARKER}) and holds files "
                        f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); choose a new or empty folder, "
                        "or pass --overwrite to write the export's files into it (files of the same names are "
                        "replaced, nothing else is deleted)")
    return []


def install_export(tmp: Path, out: Path, previous: list[str], overwrite: bool) -> None:
    """Move the finished export from `tmp` into `out`. A new folder is renamed into place whole; into an existing
    one each file is renamed (atomic per file), then files of the previous export that this one does not have are
    removed; the marker is written first with both lists (a crash half way leaves every file owned by a marker) and
    last with the new list. A file of the user's with an export file's name is replaced only with --overwrite."""
    if not out.exists():
        tmp.rename(out)
        return
    written = sorted(p.name for p in tmp.iterdir() if p.name != MARKER)
    theirs = [n for n in written if n not in previous and (out / n).exists()]
    if theirs and not overwrite:
        raise UserError(f"--out {out} holds {', '.join(theirs)}, which an earlier export did not write; move it "
                        "away, or pass --overwrite to replace it")
    write_marker(out, sorted(set(written) | set(previous)))
    for name in written:
        os.replace(tmp / name, out / name)
    for name in set(previous) - set(written):
        (out / name).unlink(missing_ok=True)
    os.replace(tmp / MARKER, out / MARKER)


def write_marker(folder: Path, files: list[str]) -> None:
    """MARKER: which tool wrote this folder and which files in it are its own (the only ones it will delete)."""
    tmp = folder / f"{MARKER}.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"tool": "scripts/convert_model.py", "files": files}, indent=2) + "\n",
                   encoding="utf-8")
    os.replace(tmp, folder / MARKER)


def remove_export(out: Path) -> None:
    """Delete the files `out`'s marker lists and the marker (the folder too if nothing else is left in it)."""
    for name in prepare_out(out, overwrite=True):
        (out / name).unlink()
    (out / MARKER).unlink(missing_ok=True)
    if not any(out.iterdir()):
        out.rmdir()


def export_model(model, tokenizer, out, fmt: str = "hf", dtype: torch.dtype = torch.float16,
                 overwrite: bool = False) -> Path:
    """Write `model` (a MiniMindForCausalLM) and `tokenizer` as a transformers folder; returns its path.

    The export is assembled beside `out` and moved into place (install_export), so a crash never leaves half a file
    behind, and only files this tool wrote are ever replaced or deleted (prepare_out).
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaForCausalLM
    out = Path(out).resolve()
    config = model.config
    if fmt == "llama" and llama_refusal(config):
        raise UserError(llama_refusal(config))
    previous = prepare_out(out, overwrite)
    ids = special_ids(tokenizer)
    cfg, target = config_json(config, fmt, dtype, ids)
    tensors = export_tensors(model, dtype, expected_tensors(LlamaForCausalLM if fmt == "llama"
                                                            else MiniMindForCausalLM, target))

    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp / "model.safetensors", 0o666 & ~umask)  # safetensors writes 0600; make it like the other files
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        GenerationConfig(**ids).save_pretrained(tmp)
        write_tokenizer(tokenizer, tmp)
        if fmt == "hf":
            write_model_code(tmp)
        write_marker(tmp, sorted(p.name for p in tmp.iterdir()))
        install_export(tmp, out, previous, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Export: native model -> one GGUF file (llama.cpp, ollama, LM Studio)

GGUF_TYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
GGUF_FILE_TYPES = {"fp32": "ALL_F32", "fp16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def gguf_refusal(config) -> str | None:
    """Why llama.cpp has no architecture computing exactly this MiniMind model (None if it has one).

    Dense -> llama. MoE -> bailingmoe, whose layer is MiniMind's: softmax router, top-k, weights renormalised when
    expert_weights_norm (MiniMind: top_k > 1 and norm_topk_prob), plus ungated shared experts of the routed experts'
    width added to the routed sum, plain GQA attention with RoPE. llama.cpp's qwen2moe gates its shared expert with a
    sigmoid and does not renormalise, deepseek does not renormalise, qwen3moe has no shared expert."""
    if config.headwise_attn_output_gate:
        return ("--format gguf cannot represent this model: it has the head-wise attention output gate "
                "(headwise_attn_output_gate=1), and no llama.cpp architecture gates attention per head. Serve it "
                "with vLLM instead: --format hf, then `vllm serve DIR --model-impl transformers --trust-remote-code` "
                "(docs/deploy.md)")
    if config.use_moe and config.n_shared_experts < 1:
        return ("--format gguf cannot represent this model: it is MoE without shared experts, and llama.cpp's MoE "
                "architecture with MiniMind's routing (bailingmoe) requires them. Use --format hf with vLLM "
                "(docs/deploy.md)")
    if minimind_rope_scaling(config):
        return ("--format gguf does not export --inference_rope_scaling: llama.cpp's YaRN multiplies attention by "
                "1 + 0.1 ln(16) on top of MiniMind's attention_factor 1.0, so the file would not compute the same "
                "model. Export without --inference_rope_scaling (positions up to 2048 are unaffected)")
    return None


def gguf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows from MiniMind's rotate-half RoPE layout (halves of each head) to llama.cpp's pairwise one."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(config, sd: dict) -> dict:
    """GGUF tensor name -> fp32 tensor, from a MiniMindForCausalLM state_dict (tied lm_head: llama uses token_embd,
    bailingmoe requires an output tensor, so it gets a copy)."""
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    out = {"token_embd.weight": sd[EMBED_KEY], "output_norm.weight": sd["model.norm.weight"]}
    if config.use_moe:
        out["output.weight"] = sd[EMBED_KEY]
    for i in range(config.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out[b + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[b + "attn_q.weight"] = gguf_permute(sd[p + "self_attn.q_proj.weight"], n_heads)
        out[b + "attn_k.weight"] = gguf_permute(sd[p + "self_attn.k_proj.weight"], n_kv)
        out[b + "attn_v.weight"] = sd[p + "self_attn.v_proj.weight"]
        out[b + "attn_output.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[b + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        if not config.use_moe:
            for ours, theirs in [("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")]:
                out[f"{b}{theirs}.weight"] = sd[f"{p}mlp.{ours}.weight"]
            continue
        out[b + "ffn_gate_inp.weight"] = sd[p + "mlp.gate.weight"]
        for ours, theirs in [("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")]:
            out[f"{b}ffn_{theirs}_exps.weight"] = torch.stack(
                [sd[f"{p}mlp.experts.{e}.{ours}.weight"] for e in range(config.n_routed_experts)])
            # several shared experts = one FFN of their summed width (rows of gate/up, columns of down)
            shared = [sd[f"{p}mlp.shared_experts.{e}.{ours}.weight"] for e in range(config.n_shared_experts)]
            out[f"{b}ffn_{theirs}_shexp.weight"] = torch.cat(shared, dim=1 if ours == "down_proj" else 0)
    return {k: v.float() for k, v in out.items()}


def gguf_vocab(tokenizer) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, llama.cpp token types, merges) from the tokenizer's tokenizer.json (byte-level BPE)."""
    import gguf
    src = Path(tokenizer.name_or_path) / "tokenizer.json"
    tj = json.loads(src.read_text(encoding="utf-8"))
    model = tj["model"]
    pre = tj.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        raise UserError(f"{src}: GGUF export needs a byte-level BPE tokenizer with GPT-2 pre-tokenization (MiniMind's "
                        f"own); this one has model {model.get('type')!r}, pre_tokenizer {pre.get('type')!r}")
    size = max(len(tokenizer), max(model["vocab"].values()) + 1)
    tokens, types = [f"[PAD{i}]" for i in range(size)], [gguf.TokenType.UNUSED] * size
    for text, i in model["vocab"].items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for t in tj.get("added_tokens", []):
        # special tokens (<|im_end|>, ...) are control tokens; <think> and the like are matched in text like words
        tokens[t["id"]] = t["content"]
        types[t["id"]] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, [int(t) for t in types], merges


def gguf_metadata(writer, config, tokenizer, name: str) -> None:
    tokens, types, merges = gguf_vocab(tokenizer)
    if len(tokens) != config.vocab_size:
        raise UserError(f"the tokenizer has {len(tokens)} tokens but the model's vocab_size is {config.vocab_size}; "
                        "pass the --tokenizer_path the model was trained with")
    head_dim = config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if config.use_moe:
        writer.add_expert_count(config.n_routed_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_shared_count(config.n_shared_experts)
        writer.add_expert_feed_forward_length(config.intermediate_size)
        writer.add_leading_dense_block_count(0)
        # MiniMind renormalises the top-k weights only for k > 1 (MoEGate); no extra scale
        writer.add_expert_weights_norm(bool(config.num_experts_per_tok > 1 and config.norm_topk_prob))
        writer.add_expert_weights_scale(1.0)
    ids = special_ids(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # ByteLevel with the GPT-2 split regex (checked in gguf_vocab)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(ids["bos_token_id"])
    writer.add_eos_token_id(ids["eos_token_id"][0])  # <|im_end|>: end of a turn
    if ids["pad_token_id"] is not None:
        writer.add_pad_token_id(ids["pad_token_id"])
    writer.add_add_bos_token(False)  # the chat template writes <|im_start|> itself
    writer.add_add_eos_token(False)
    writer.add_chat_template(tokenizer.chat_template)


def gguf_array(t: torch.Tensor, dtype: str):
    """(numpy data, GGML type) of one tensor: 1-D tensors (norms) stay F32 as llama.cpp's own converter keeps them."""
    import gguf
    data = t.detach().to("cpu", torch.float32).contiguous().numpy()
    qtype = gguf.GGMLQuantizationType[GGUF_TYPES[dtype]] if t.dim() > 1 else gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype("float16"), qtype
    if qtype in (gguf.GGMLQuantizationType.BF16, gguf.GGMLQuantizationType.Q8_0):
        if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
            raise UserError(f"q8_0 needs rows that are a multiple of 32 values; a tensor has {data.shape[-1]}: "
                            "use --dtype fp16")
        return gguf.quants.quantize(data, qtype), qtype
    return data, qtype


def export_gguf(model, tokenizer, out, dtype: str = "fp16") -> Path:
    """Write `model` (MiniMindForCausalLM, gate off) as one GGUF file (weights, tokenizer, chat template); returns its
    path. Written beside `out` and renamed into place."""
    import gguf
    out = Path(out).resolve()
    config = model.config
    if gguf_refusal(config):
        raise UserError(gguf_refusal(config))
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; --format gguf writes one file (e.g. --out MiniMind.gguf)")
    sd = {k: v for k, v in model.state_dict().items() if k != TIED_KEY}
    check_tensors(sd, {k: v for k, v in expected_tensors(MiniMindForCausalLM, config).items() if k != TIED_KEY},
                  "export", "This is a bug in the converter.")
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(tmp), "bailingmoe" if config.use_moe else "llama")
    try:
        gguf_metadata(writer, config, tokenizer, out.stem)
        writer.add_file_type(int(gguf.LlamaFileType[GGUF_FILE_TYPES[dtype]]))
        for name, t in gguf_tensors(config, sd).items():
            data, qtype = gguf_array(t, dtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def verify_gguf(out: Path, model, dtype: str) -> str:
    """Read the file back (gguf's reader): every tensor equals the source mapped and rounded the same way, and the
    metadata names the tokenizer and template. (Whether llama.cpp computes the same tokens: tests/test_deploy_gguf.py.)"""
    import gguf
    reader = gguf.GGUFReader(str(out))
    sd = {k: v for k, v in model.state_dict().items() if k != TIED_KEY}
    expected = gguf_tensors(model.config, sd)
    got = {t.name: t for t in reader.tensors}
    # GGUF lists dimensions innermost first
    shapes = {k: torch.empty([int(n) for n in reversed(t.shape)], device="meta") for k, t in got.items()}
    check_tensors(shapes, expected, f"verification of {out}", "This is a bug in the converter.")
    worst = 0.0
    for name, t in got.items():
        data, qtype = gguf_array(expected[name], dtype)
        back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(expected[name].shape)
        want = gguf.quants.dequantize(data, qtype).reshape(expected[name].shape)
        worst = max(worst, float(abs(back.astype("float64") - want).max()))
    if worst != 0.0:
        raise UserError(f"verification failed: {out} holds tensors that differ from the source by up to {worst:.3g}")
    template = reader.fields.get("tokenizer.chat_template")
    if template is None:
        raise UserError(f"verification failed: {out} has no chat template")
    return f"verified: {len(got)} tensors read back equal to the source ({dtype}), chat template and tokenizer present"


# --------------------------------------------------------------------------------------------------------------------
# Import: transformers folder -> native model


def read_config_json(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise UserError(f"{folder} has no config.json; --from_hf needs a transformers model folder "
                        "(e.g. one written by --format hf or --format llama)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}); re-export the folder") from None


def minimind_config_from_llama(folder: Path):
    """A MiniMindConfig computing exactly what the Llama folder computes, or a UserError saying what differs."""
    from transformers import LlamaConfig
    c = LlamaConfig.from_pretrained(folder)  # normalises rope_theta/rope_scaling into rope_parameters
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = dict(c.rope_parameters or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    ours = minimind_rope_scaling(MiniMindConfig(inference_rope_scaling=True,
                                                max_position_embeddings=c.max_position_embeddings))
    problems = []
    if c.attention_bias or c.mlp_bias:
        problems.append("it has attention/MLP biases (MiniMind's linear layers have none)")
    if c.hidden_act != "silu":
        problems.append(f"its activation is {c.hidden_act} (MiniMind uses silu)")
    if head_dim * c.num_attention_heads != c.hidden_size:
        problems.append(f"head_dim {head_dim} x {c.num_attention_heads} heads != hidden_size {c.hidden_size}")
    if rope_type == "yarn":
        if ours is None or any(float(rope.get(k, 0)) != float(v) for k, v in ours.items() if k != "rope_type"):
            problems.append(f"its YaRN settings {rope} differ from MiniMind's {YARN}")
    elif rope_type != "default":
        problems.append(f"its rope scaling is {rope_type!r} (MiniMind has plain RoPE or its fixed YaRN)")
    if problems:
        raise UserError(f"{folder} is a Llama model MiniMind cannot reproduce: {'; '.join(problems)}")
    return MiniMindConfig(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads or c.num_attention_heads,
        vocab_size=c.vocab_size, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_theta=float(rope["rope_theta"]), inference_rope_scaling=rope_type == "yarn", use_moe=False,
        headwise_attn_output_gate=False, tie_word_embeddings=True,
    ), ("llama", c.tie_word_embeddings)


def read_folder_config(folder: Path):
    """(MiniMindConfig, (source model type, whether the folder ties lm_head to the embedding))."""
    raw = read_config_json(folder)
    kind = raw.get("model_type")
    if kind == "llama":
        return minimind_config_from_llama(folder)
    if kind != "minimind":
        raise UserError(f"{folder}/config.json has model_type {kind!r}; --from_hf reads 'minimind' (--format hf) "
                        "and 'llama' (--format llama) folders")
    fields = set(MiniMindConfig().to_dict()) - FILE_KEYS
    config = MiniMindConfig(**{k: v for k, v in raw.items() if k in fields})
    return config, ("minimind", raw.get("tie_word_embeddings", True))


def read_folder_tensors(folder: Path) -> dict:
    """All tensors of model.safetensors, a sharded model.safetensors.index.json, or a pytorch_model.bin."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").exists():
        files = [folder / "model.safetensors"]
    elif index.exists():
        files = [folder / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    elif (folder / "pytorch_model.bin").exists():
        files = [folder / "pytorch_model.bin"]
    else:
        raise UserError(f"{folder} has no model.safetensors (or index / pytorch_model.bin); is it a model folder?")
    sd = {}
    for f in files:
        try:
            sd.update(torch.load(f, map_location="cpu", weights_only=True) if f.suffix == ".bin" else load_file(f))
        except (SafetensorError, OSError, RuntimeError, pickle.UnpicklingError) as e:
            raise UserError(f"{f} cannot be read ({type(e).__name__}: {e}); the file is damaged or incomplete, "
                            "re-export or re-download it") from None
    return sd


def import_folder(folder) -> tuple[MiniMindConfig, dict]:
    """(config, native state_dict in the folder's dtype) of a transformers folder, strictly checked."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--from_hf {folder} is not a folder")
    config, (kind, folder_ties) = read_folder_config(folder)
    sd = read_folder_tensors(folder)
    # rotary tables are derived from rope_theta (old Llama checkpoints stored them as buffers)
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if TIED_KEY not in sd and EMBED_KEY in sd:
        if not folder_ties:
            raise UserError(f"{folder}: config.json says tie_word_embeddings=false but there is no {TIED_KEY}")
        sd[TIED_KEY] = sd[EMBED_KEY]
    elif TIED_KEY in sd and EMBED_KEY in sd and not torch.equal(sd[TIED_KEY], sd[EMBED_KEY]):
        raise UserError(f"{folder} has an lm_head that differs from the input embedding; MiniMind always ties them, "
                        "so this model cannot be converted without changing its outputs")
    expected = expected_tensors(MiniMindForCausalLM, config)
    check_tensors(sd, expected, f"--from_hf {folder} ({kind})",
                  "Convert only folders written by this tool or models with MiniMind's exact layout.")
    return config, {k: sd[k] for k in expected}  # the key order training writes


def native_state_dict(sd: dict, folder) -> dict:
    """fp16 tensors in the order of MiniMindForCausalLM.state_dict() (as training writes them), refusing overflow."""
    out = {}
    for k, v in sd.items():
        half = v.to(torch.float16)
        if v.is_floating_point() and bool(torch.isfinite(v).all()) and not bool(torch.isfinite(half).all()):
            raise UserError(f"{folder}: tensor {k} has values beyond fp16's range (|x| > 65504); MiniMind's native "
                            "files are fp16, so this model cannot be stored natively without changing it")
        out[k] = half
    return out


# --------------------------------------------------------------------------------------------------------------------
# Verification: logits of the written model against the source


def probe_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def max_logit_diff(a, b, vocab_size: int) -> tuple[float, float]:
    """(max |logits_a - logits_b|, max |logits_a|) on a fixed probe batch, both models in fp32 eval mode."""
    ids = probe_ids(vocab_size)
    la = a.float().eval()(ids).logits
    lb = b.float().eval()(ids).logits
    return float((la - lb).abs().max()), float(la.abs().max())


def check_close(diff: float, scale: float, what: str) -> str:
    # fp32 kernels differ between the two implementations by rounding only (~1e-6 relative)
    if diff > 1e-4 * max(1.0, scale):
        raise UserError(f"verification failed: {what} differ by {diff:.3g} (logits up to {scale:.3g}); "
                        "the converted model does not compute the same function")
    return f"verified: max |Δlogits| = {diff:.3g} ({what}, logits up to {scale:.3g})"


def verify_export(out: Path, fmt: str) -> str:
    """Load the folder back through transformers and compare with a native model built from the same tensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    loader = LlamaForCausalLM if fmt == "llama" else AutoModelForCausalLM
    loaded = loader.from_pretrained(out, trust_remote_code=fmt == "hf", dtype=torch.float32)
    config, sd = import_folder(out)
    native = MiniMindForCausalLM(config)
    native.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    AutoTokenizer.from_pretrained(out)  # the tokenizer files load on their own
    return check_close(*max_logit_diff(native, loaded, config.vocab_size), f"{type(loaded).__name__} vs native")


def verify_import(folder: Path, kind: str, config: MiniMindConfig, args) -> str:
    """Load the written .pth as eval_llm.py does and compare with the folder's model (our classes, no remote code)."""
    from transformers import LlamaForCausalLM
    ref = (LlamaForCausalLM if kind == "llama" else MiniMindForCausalLM).from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():  # the native file is fp16 by convention: compare the mapping, not that rounding
        for t in ref.state_dict().values():
            t.copy_(t.half())
    p = argparse.ArgumentParser()
    add_model_args(p)
    yarn = ["--inference_rope_scaling"] if config.inference_rope_scaling else []
    native, _ = load_model(p.parse_args(["--weight", args.save_weight, "--save_dir", args.save_dir,
                                         "--tokenizer_path", str(folder), *yarn]))
    return check_close(*max_logit_diff(ref, native, config.vocab_size), "eval_llm's load vs the folder")


# --------------------------------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    p = argparse.ArgumentParser(description="MiniMind 权重格式转换 / convert native .pth <-> transformers folders",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--format", choices=["hf", "llama", "gguf"], default="hf",
                   help="导出格式 / export as: hf = MiniMind code + trust_remote_code (any model; vLLM); "
                        "llama = plain LlamaForCausalLM (dense, gate off); gguf = one llama.cpp file (gate off)")
    p.add_argument("--out", type=str, default=None,
                   help="导出目录 / output folder for the transformers model: new, empty, or an earlier export")
    p.add_argument("--overwrite", action="store_true",
                   help="允许写入非导出目录 / also write into a non-empty folder that is not an earlier export "
                        "(files of the export's names are replaced; nothing else is deleted)")
    p.add_argument("--dtype", choices=[*DTYPES, "q8_0"], default="fp16",
                   help="导出精度 / dtype of the exported tensors (fp16 = lossless from a native .pth; q8_0: gguf only)")
    p.add_argument("--from_hf", type=str, default=None,
                   help="导入: transformers 目录 -> 原生 .pth / import this folder into {save_dir}/{save_weight}_*.pth")
    p.add_argument("--save_weight", type=str, default=None, help="导入后的权重名 / weight name for --from_hf")
    p.add_argument("--verify", type=int, choices=[0, 1], default=1,
                   help="转换后重新加载并对比 logits / reload the result and compare logits with the source")
    args = p.parse_args(argv)

    if args.from_hf:
        # ---------------------------------------------------------------- transformers folder -> native .pth
        if not args.save_weight:
            raise UserError("--from_hf needs --save_weight NAME (the file becomes {save_dir}/NAME_{hidden}.pth)")
        resolve_model_paths(args)
        folder = Path(args.from_hf).resolve()
        config, sd = import_folder(folder)
        path = weight_path(args.save_dir, args.save_weight, config.hidden_size, config.use_moe)
        if os.path.exists(path):
            raise UserError(f"{path} already exists; choose another --save_weight or delete it first")
        kind = read_config_json(folder)["model_type"]
        tok = str(folder) if (folder / "tokenizer.json").exists() else None
        save_weights(native_state_dict(sd, folder), path, config, stage="convert", weight=args.save_weight,
                     source=str(folder), source_format=kind, tokenizer_path=tok, args=vars(args))
        print(f"wrote {path} (+ .json sidecar) from {folder} ({kind})")
        if args.verify:
            try:
                print(verify_import(folder, kind, config, args))
            except UserError as e:  # leave nothing behind that eval_llm.py would load wrongly
                for f in (path, sidecar_path(path)):
                    os.remove(f)
                raise UserError(f"{e}; removed {path}") from None
        # YaRN is a load-time switch of the native loaders, not part of the weights
        yarn = " --inference_rope_scaling" if config.inference_rope_scaling else ""
        print(f"chat with it: python eval_llm.py --weight {args.save_weight} --save_dir {args.save_dir}{yarn}")
        return

    # -------------------------------------------------------------------- native .pth -> transformers folder
    if not args.out:
        raise UserError("give --out DIR to export (or --from_hf DIR --save_weight NAME to import)")
    if is_hf_dir(args):
        raise UserError("--load_from points at a transformers folder; export reads native weights (--weight), "
                        "and --from_hf DIR imports a folder")
    if args.format == "gguf":
        return main_gguf(args)
    if args.dtype == "q8_0":
        raise UserError("--dtype q8_0 is a GGUF quantisation; use it with --format gguf (transformers folders take "
                        "fp32, fp16 or bf16)")
    out = Path(args.out).resolve()
    prepare_out(out, args.overwrite)  # fail before loading anything
    model, tokenizer = load_model(args)
    if args.format == "llama" and llama_refusal(model.config):
        raise UserError(llama_refusal(model.config))
    out = export_model(model.eval(), tokenizer, out, args.format, DTYPES[args.dtype], args.overwrite)
    print(f"wrote {out} ({args.format}, {args.dtype})")
    if args.verify:
        del model
        try:
            print(verify_export(out, args.format))
        except UserError as e:
            remove_export(out)  # what this export wrote, nothing else
            raise UserError(f"{e}; removed the export's files from {out}") from None
    if args.format == "hf":
        print(f"load it: AutoModelForCausalLM.from_pretrained('{out}', trust_remote_code=True)")
    else:
        print(f"load it: LlamaForCausalLM.from_pretrained('{out}')  |  vllm serve {out}")


def is_gguf_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def main_gguf(args) -> None:
    """--format gguf: native weights -> one GGUF file, read back and checked (--verify 1)."""
    out = Path(args.out).resolve()
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; --format gguf writes one file (e.g. --out MiniMind.gguf)")
    if any(p in out.parents for p in (ROOT / name for name in SOURCE_FOLDERS)):
        raise UserError(f"--out {out} is inside this repository's source ({', '.join(SOURCE_FOLDERS)}); write the "
                        "GGUF elsewhere, e.g. --out MiniMind.gguf")
    if out.is_file() and not args.overwrite and not is_gguf_file(out):
        raise UserError(f"--out {out} exists and is not a GGUF file; choose a new name, or pass --overwrite to "
                        "replace it")
    model, tokenizer = load_model(args)
    if gguf_refusal(model.config):
        raise UserError(gguf_refusal(model.config))
    out = export_gguf(model.eval(), tokenizer, out, args.dtype)
    arch = "bailingmoe" if model.config.use_moe else "llama"
    print(f"wrote {out} (gguf, {arch}, {args.dtype})")
    if args.verify:
        try:
            print(verify_gguf(out, model, args.dtype))
        except UserError as e:
            out.unlink()
            raise UserError(f"{e}; removed {out}") from None
    print(f"run it: llama-cli -m {out}  |  python -c \"from llama_cpp import Llama; Llama('{out}')\"  (docs/deploy.md)")


if __name__ == "__main__":
    # a half-written export is a temp folder that export_model removes; not the training scripts' message
    run_main(main, interrupted="(interrupted)")
