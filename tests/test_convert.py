"""scripts/convert_model.py: native .pth <-> transformers folders, on tiny models the tests create.

    python -m pytest tests/test_convert.py -q

What is shown: the remote-code folder (MoE + head-wise gate) loads through AutoModelForCausalLM in a clean interpreter
that never imports this repo (one CLI run writes it) and gives the native logits; its tokenizer renders the repo's chat
template; the Llama folder (dense, gate off, also with YaRN) gives them through LlamaForCausalLM; HF generate with the
saved generation_config stops at <|im_end|>; fp16 .pth -> folder (fp16/fp32, hf/llama, MoE + gate) -> .pth is
bit-identical, bf16 is exactly the bf16 rounding; a LoRA-merged export equals what eval_llm loads with --lora_weight;
a Llama folder saved by transformers itself imports with its own eps/theta/sizes; MoE/gated models are refused for
Llama; key mismatches and damaged files stop with a message naming them; a failed verification leaves no output.
"""
import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_script, script_env
from model.model_lora import apply_lora, apply_lora_from_file, lora_state_dict
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer.chat_utils import add_model_args, load_model
from trainer.trainer_utils import UserError, run_main, save_weights, weight_path

spec = importlib.util.spec_from_file_location("convert_model", ROOT / "scripts" / "convert_model.py")
cm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cm)

IDS = torch.randint(3, 6400, (2, 20), generator=torch.Generator().manual_seed(3))
CHAIN = [300, 301, 302, 2]  # the crafted model's greedy continuation: a -> b -> c -> <|im_end|>


def make_native(save_dir, moe=False, gate=False, weight="full_sft", seed=0, std=0.1, heads=4, kv_heads=2):
    """A random tiny model saved as training saves it (fp16 .pth + sidecar). Weights larger than the init's 0.02,
    so logits spread over several units and a wrong mapping could not hide in rounding."""
    torch.manual_seed(seed)
    config = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
                            use_moe=moe, headwise_attn_output_gate=gate)
    model = MiniMindForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else std * torch.randn_like(p))
    path = weight_path(str(save_dir), weight, 64, moe)
    save_weights(model.state_dict(), path, config, stage="full_sft", args={})
    return path


def native(save_dir, *extra, weight="full_sft"):
    """The model as eval_llm.py loads it (trainer.chat_utils), fp32, eval mode."""
    p = argparse.ArgumentParser()
    add_model_args(p)
    model, tok = load_model(p.parse_args(["--weight", weight, "--save_dir", str(save_dir), *extra]))
    return model.eval(), tok


def convert(*argv):
    cm.main([str(a) for a in argv])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model.float().eval()(ids).logits


def make_chain_model(save_dir, moe=True, gate=True, **sizes):
    """A MoE + gate model whose greedy continuation of `a` is b, c, <|im_end|>, <|im_end|>, ...: every block's output
    projection is zero, so the residual stream is the token's embedding, and the tied embeddings put a, b, c, end on
    rays 60 degrees apart with radii 1, 3, 9, 27: each token's best match is the next; the final norm sharpens it."""
    path = make_native(save_dir, moe=moe, gate=gate, std=0.02, **sizes)
    sd = torch.load(path, weights_only=True)
    for k in sd:
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            sd[k].zero_()
    emb = torch.zeros_like(sd["model.embed_tokens.weight"])
    for i, (tok, radius) in enumerate(zip(CHAIN, [1.0, 3.0, 9.0, 27.0])):
        angle = torch.tensor(i * torch.pi / 3)
        emb[tok, :2] = radius * torch.stack([angle.cos(), angle.sin()])
    sd["model.embed_tokens.weight"] = sd["lm_head.weight"] = emb.half()
    sd["model.norm.weight"].fill_(10.0)
    torch.save(sd, path)


# ----------------------------------------------------------------------------------------------------------------------
# The remote-code folder in a clean interpreter (one CLI run + one loader run, shared by two tests)

CLEAN_LOADER = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
job = json.load(open(sys.argv[1]))
res = {}
m = AutoModelForCausalLM.from_pretrained(job["moe"], trust_remote_code=True, dtype=torch.float32).eval()
res["module"] = type(m).__module__
res["repo_imported"] = any(k == "model" or k.startswith(("model.", "trainer")) for k in sys.modules)
with torch.no_grad():
    torch.save(m(torch.tensor(job["ids"])).logits, job["logits_out"])
# plain (transformers asks about config.json's custom code, stdin is empty: "no", so it falls back) and trusted
for key, kw in [("chat", {}), ("chat_trusted", {"trust_remote_code": True})]:
    tok = AutoTokenizer.from_pretrained(job["moe"], **kw)
    res[key] = [tok.apply_chat_template(c["messages"], tools=c.get("tools"), tokenize=False,
                                        add_generation_prompt=True) for c in job["conversations"]]
res["ids"] = [tok.encode(t) for t in res["chat"]]
g = AutoModelForCausalLM.from_pretrained(job["chain"], trust_remote_code=True, dtype=torch.float32).eval()
prompt = torch.tensor([[1, job["first"]]])
res["eos"] = g.generation_config.eos_token_id
res["generated"] = g.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8)[0].tolist()
print(json.dumps(res))
"""

CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "你是 MiniMind。"}, {"role": "user", "content": "3 加 4 等于多少？"},
                  {"role": "assistant", "content": "<think>\n3+4=7\n</think>\n<answer>\n7\n</answer>"},
                  {"role": "user", "content": "And 5 + 6?"}]},
    {"messages": [{"role": "user", "content": "What is 2+2?"}],
     "tools": [{"type": "function", "function": {"name": "add", "description": "add two numbers",
                                                  "parameters": {"type": "object", "properties": {
                                                      "a": {"type": "number"}, "b": {"type": "number"}}}}}]},
]


@pytest.fixture(scope="module")
def clean_load(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("convert_clean")
    make_native(tmp / "out", moe=True, gate=True)
    proc = run_script("scripts/convert_model.py", "--weight", "full_sft", "--save_dir", tmp / "out", "--format", "hf",
                      "--dtype", "fp32", "--out", tmp / "moe_hf", tmp=tmp)
    assert "verified: max |Δlogits| = 0 " in proc.stdout, proc.stdout
    make_chain_model(tmp / "chain")
    model, tok = native(tmp / "chain")
    cm.export_model(model, tok, tmp / "chain_hf", "hf", torch.float32)

    job = {"moe": str(tmp / "moe_hf"), "chain": str(tmp / "chain_hf"), "ids": IDS.tolist(),
           "logits_out": str(tmp / "logits.pt"), "conversations": CONVERSATIONS, "first": CHAIN[0]}
    (tmp / "job.json").write_text(json.dumps(job))
    (tmp / "loader.py").write_text(CLEAN_LOADER)
    env = script_env(tmp)
    env.pop("PYTHONPATH", None)
    env["HF_MODULES_CACHE"] = str(tmp / "hf_modules")  # where trust_remote_code copies the folder's code
    # cwd outside the repo and the script outside it: nothing of ours is importable, only the folder's copied code
    out = subprocess.run([sys.executable, str(tmp / "loader.py"), str(tmp / "job.json")], cwd=tmp, env=env,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-4000:]
    return tmp, json.loads(out.stdout.strip().splitlines()[-1])


def test_remote_code_folder_moe_gate_gives_native_logits_in_a_clean_process(clean_load):
    tmp, res = clean_load
    assert res["module"].startswith("transformers_modules.") and not res["repo_imported"]
    cfg = json.loads((tmp / "moe_hf" / "config.json").read_text())
    assert cfg["model_type"] == "minimind" and cfg["use_moe"] and cfg["headwise_attn_output_gate"]
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "model_minimind.MiniMindForCausalLM"
    assert (tmp / "moe_hf" / "model_minimind.py").read_bytes() == (ROOT / "model" / "model_minimind.py").read_bytes()
    model, _ = native(tmp / "out")
    want = logits(model)
    got = torch.load(tmp / "logits.pt", weights_only=True)
    assert want.abs().max() > 1.0  # not a near-uniform output where anything would match
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_folder_tokenizer_renders_the_repo_template_and_generate_stops_at_im_end(clean_load):
    tmp, res = clean_load
    _, tok = native(tmp / "out")
    want = [tok.apply_chat_template(c["messages"], tools=c.get("tools"), tokenize=False, add_generation_prompt=True)
            for c in CONVERSATIONS]
    assert res["chat"] == res["chat_trusted"] == want and "<tools>" in want[1] and "<think>" in want[0]
    assert res["ids"] == [tok.encode(t) for t in want]
    tcfg = json.loads((tmp / "moe_hf" / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] and tcfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert 2 in res["eos"]

    # without a stop the crafted model would repeat <|im_end|>: the saved eos is what ends the reply
    model, _ = native(tmp / "chain")
    ids = torch.tensor([[1, CHAIN[0]]])
    for _ in range(5):
        ids = torch.cat([ids, logits(model, ids)[:, -1:].argmax(-1)], dim=1)
    assert ids[0, 1:].tolist() == CHAIN + [2, 2]
    assert res["generated"] == [1] + CHAIN


# ----------------------------------------------------------------------------------------------------------------------
# Llama folder, round trips, LoRA, refusals, strict keys (in process)


def test_llama_folder_gives_native_logits_with_and_without_yarn(tmp_path):
    from transformers import LlamaForCausalLM
    make_native(tmp_path / "out")
    for yarn in (False, True):
        flag = ["--inference_rope_scaling"] if yarn else []
        out = tmp_path / f"llama{int(yarn)}"
        convert("--weight", "full_sft", "--save_dir", tmp_path / "out", "--format", "llama", "--out", out, *flag)
        assert not list(out.glob("*.py"))
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in cfg
        assert (cfg.get("rope_scaling") or {}).get("rope_type") == ("yarn" if yarn else None)
        llama = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
        model, _ = native(tmp_path / "out", *flag)
        torch.testing.assert_close(logits(llama), logits(model), rtol=0, atol=1e-5)
        if yarn:
            assert (logits(native(tmp_path / "out")[0]) - logits(model)).abs().max() > 1e-3  # YaRN did change them


def round_trip(save_dir, name, fmt, dtype, *flag, moe=False):
    """native full_sft -> folder -> native {name}: (tensors read back, their sidecar)."""
    convert("--weight", "full_sft", "--save_dir", save_dir, "--format", fmt, "--dtype", dtype,
            "--out", save_dir.parent / name, *flag)
    convert("--from_hf", save_dir.parent / name, "--save_weight", name, "--save_dir", save_dir)
    path = weight_path(str(save_dir), name, 64, moe)
    return torch.load(path, weights_only=True), json.loads(Path(path[:-4] + ".json").read_text())


def bits_equal(a: dict, b: dict) -> bool:
    """Same keys in the same order, all fp16, equal bit patterns (so -0.0 vs 0.0 or NaN payloads would count)."""
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype == torch.float16 and
                                      torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a)


def test_round_trip_back_to_pth_is_bit_identical(tmp_path):
    """fp16 .pth -> folder (hf fp16/fp32, llama fp16/fp32, with and without YaRN; MoE + gate through hf) -> .pth gives
    the same tensors bit for bit and the same model config. bf16 is lossy by design: the result is exactly the
    original rounded to bf16 (fp16 has 3 more mantissa bits)."""
    yarn = "--inference_rope_scaling"
    src = make_native(tmp_path / "out")
    orig = torch.load(src, weights_only=True)
    first = json.loads(Path(src[:-4] + ".json").read_text())["model_config"]
    for fmt, dtype, *flag in [("hf", "fp16"), ("hf", "fp32"), ("llama", "fp16"), ("hf", "fp16", yarn),
                              ("llama", "fp32", yarn)]:
        name = f"rt_{fmt}_{dtype}{'_yarn' if flag else ''}"
        back, side = round_trip(tmp_path / "out", name, fmt, dtype, *flag)
        assert bits_equal(back, orig), name
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size", "vocab_size", "rope_theta", "rms_norm_eps", "use_moe",
                    "headwise_attn_output_gate", "max_position_embeddings"):
            assert side["model_config"][key] == first[key], (name, key)
        assert side["model_config"]["inference_rope_scaling"] == bool(flag)
        assert side["stage"] == "convert" and side["tokenizer_path"] == str(tmp_path / name)

    back, _ = round_trip(tmp_path / "out", "rt_bf16", "hf", "bf16")
    assert bits_equal(back, {k: v.to(torch.bfloat16).half() for k, v in orig.items()})
    assert not bits_equal(back, orig)

    src = make_native(tmp_path / "moe", moe=True, gate=True)
    back, side = round_trip(tmp_path / "moe", "rt_moe", "hf", "fp16", moe=True)
    assert bits_equal(back, torch.load(src, weights_only=True))
    assert side["model_config"]["use_moe"] and side["model_config"]["headwise_attn_output_gate"]


def test_lora_merged_export_equals_eval_llm_with_lora(tmp_path):
    make_native(tmp_path / "out", gate=True)
    base, _ = native(tmp_path / "out")
    config = base.config
    apply_lora(base, rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    with torch.no_grad():
        for p in lora_state_dict(base).values():
            p.copy_(0.1 * torch.randn_like(p))
    lora_path = weight_path(str(tmp_path / "out" / "lora"), "lora_identity", 64, False)
    save_weights(lora_state_dict(base), lora_path, config, stage="lora",
                 args={"lora_rank": 4, "lora_alpha": 8.0, "lora_target": "q_proj,v_proj,down_proj"})

    convert("--weight", "full_sft", "--save_dir", tmp_path / "out", "--lora_weight", "lora_identity",
            "--dtype", "fp32", "--out", tmp_path / "merged")
    from transformers import AutoModelForCausalLM
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with_lora, _ = native(tmp_path / "out", "--lora_weight", "lora_identity")
    assert torch.equal(logits(exported), logits(with_lora))

    adapted = apply_lora_from_file(native(tmp_path / "out")[0], lora_path)  # unmerged adapters, scale alpha/rank 2
    torch.testing.assert_close(logits(exported), logits(adapted), rtol=0, atol=1e-4)
    assert (logits(exported) - logits(native(tmp_path / "out")[0])).abs().max() > 1e-2


@pytest.mark.parametrize("moe,gate,reason", [(True, False, "MoE"), (False, True, "gate")])
def test_llama_format_refuses_moe_and_gated_models(tmp_path, capsys, moe, gate, reason):
    make_native(tmp_path / "out", moe=moe, gate=gate)
    argv = ["--weight", "full_sft", "--save_dir", str(tmp_path / "out"), "--format", "llama", "--out",
            str(tmp_path / "llama")]
    with pytest.raises(SystemExit) as e:
        run_main(lambda: cm.main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    assert reason in err and "Use --format hf" in err and "Llama" in err
    assert not (tmp_path / "llama").exists()


def test_strict_key_checks_name_the_tensors(tmp_path):
    from safetensors.torch import load_file, save_file
    make_native(tmp_path / "out", gate=True)
    model, tok = native(tmp_path / "out")
    folder = cm.export_model(model, tok, tmp_path / "hf")
    good = load_file(folder / "model.safetensors")
    assert "lm_head.weight" not in good  # tied: stored once, re-tied on load

    def broken(sd, match):
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(UserError, match=match):
            cm.import_folder(folder)

    q = "model.layers.1.self_attn.q_proj.weight"
    broken({k: v for k, v in good.items() if k != q}, f"missing 1: \\['{q}'\\]")
    broken({**good, "model.layers.2.mlp.up_proj.weight": good[q].clone()}, "unexpected 1: .*layers.2.mlp.up_proj")
    broken({**good, q: good[q][:64].clone()}, r"wrong shapes: .*q_proj.weight \(64, 64\) \(expected \(68, 64\)\)")
    broken({**good, "lm_head.weight": good["model.embed_tokens.weight"] + 1}, "lm_head that differs")

    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="model.safetensors cannot be read .*damaged"):
        cm.import_folder(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2"}))
    with pytest.raises(UserError, match="model_type 'qwen2'"):
        cm.import_folder(folder)
    with pytest.raises(UserError, match="not an export of this tool"):
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("keep me")
        cm.export_model(model, tok, tmp_path / "mine")


def test_foreign_llama_folder_imports_with_its_own_eps_theta_and_sizes(tmp_path):
    """A Llama folder saved by transformers itself (fp32, rms_norm_eps 1e-6, rope_theta 1e4, untypical FFN width)
    becomes a native file that eval_llm's loader turns back into the same function (up to the fp16 storage)."""
    import shutil
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    kw = dict(vocab_size=6400, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=4096,
              tie_word_embeddings=True)
    llama = LlamaForCausalLM(LlamaConfig(**kw))
    with torch.no_grad():
        for p in llama.parameters():
            p.copy_((0.3 * torch.randn_like(p)).half())  # fp16-exact values, so the native file loses nothing
    llama.save_pretrained(tmp_path / "foreign")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(ROOT / "model" / f, tmp_path / "foreign" / f)
    convert("--from_hf", tmp_path / "foreign", "--save_weight", "foreign", "--save_dir", tmp_path / "out")
    model, _ = native(tmp_path / "out", weight="foreign")
    assert model.config.rms_norm_eps == 1e-6 and model.config.rope_theta == 1e4
    torch.testing.assert_close(logits(model), logits(llama), rtol=0, atol=1e-5)

    LlamaForCausalLM(LlamaConfig(**kw, attention_bias=True)).save_pretrained(tmp_path / "biased")
    with pytest.raises(UserError, match="biases"):
        convert("--from_hf", tmp_path / "biased", "--save_weight", "biased", "--save_dir", tmp_path / "out")


def test_a_conversion_that_fails_verification_leaves_nothing_behind(tmp_path, monkeypatch):
    make_native(tmp_path / "out")
    convert("--weight", "full_sft", "--save_dir", tmp_path / "out", "--out", tmp_path / "hf")
    monkeypatch.setattr(cm, "max_logit_diff", lambda *a: (0.5, 2.0))  # as if the mapping were wrong
    with pytest.raises(UserError, match="verification failed: .* differ by 0.5.*removed"):
        convert("--weight", "full_sft", "--save_dir", tmp_path / "out", "--out", tmp_path / "hf2")
    with pytest.raises(UserError, match="verification failed"):
        convert("--from_hf", tmp_path / "hf", "--save_weight", "back", "--save_dir", tmp_path / "out")
    assert not (tmp_path / "hf2").exists() and not list((tmp_path / "out").glob("back_*"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="verification failed"):
        convert("--weight", "full_sft", "--save_dir", tmp_path / "out", "--out", tmp_path / "mine", "--overwrite")
    assert snapshot(tmp_path / "mine") == {"notes.txt": b"keep me"}  # only the export's own files were removed


# ----------------------------------------------------------------------------------------------------------------------
# --out never deletes or overwrites what this tool did not write (issue 16, item 2)


def snapshot(folder: Path) -> dict:
    """{relative path: bytes} of every file under `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_user_folder_with_code_and_config_survives(tmp_path):
    """A folder of the user's holding a *.py and a config.json is not an export of this tool: refused without
    --overwrite, and with --overwrite the export's files are added but nothing of the user's is deleted."""
    make_native(tmp_path / "out")
    user = tmp_path / "my_project"
    user.mkdir()
    (user / "train.py").write_text("print('my own script')\n")
    (user / "config.json").write_text('{"my": "settings"}\n')
    before = snapshot(user)
    argv = ["--weight", "full_sft", "--save_dir", tmp_path / "out", "--out", user, "--verify", "0"]
    with pytest.raises(UserError, match=r"my_project .*not an export of this tool.*--overwrite"):
        convert(*argv)
    assert snapshot(user) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_project", "out"]  # no temp folder left behind

    convert(*argv, "--overwrite")
    after = snapshot(user)
    assert after["train.py"] == before["train.py"]
    assert json.loads(after["config.json"])["model_type"] == "minimind"  # named file: replaced, as asked
    marker = json.loads(after[cm.MARKER])
    assert marker["tool"] == "scripts/convert_model.py" and "train.py" not in marker["files"]
    assert {"model.safetensors", "config.json", "model_minimind.py"} <= set(marker["files"])

    # a later export into the same folder (now marked) replaces only what the marker lists
    convert("--weight", "full_sft", "--save_dir", tmp_path / "out", "--out", user, "--verify", "0", "--format",
            "llama")
    final = snapshot(user)
    assert final["train.py"] == before["train.py"]
    assert "model_minimind.py" not in final  # the previous export's code file (listed) is gone: llama has none
    assert json.loads(final["config.json"])["model_type"] == "llama"


def test_re_export_replaces_its_own_files_and_keeps_files_added_later(tmp_path):
    make_native(tmp_path / "out")
    argv = ["--weight", "full_sft", "--save_dir", tmp_path / "out", "--out", tmp_path / "hf", "--verify", "0"]
    convert(*argv)
    (tmp_path / "hf" / "README.md").write_text("my model card\n")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"stale")
    convert(*argv)
    assert (tmp_path / "hf" / "README.md").read_text() == "my model card\n"
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() != b"stale"
    cm.import_folder(tmp_path / "hf")  # a complete, readable export
    (tmp_path / "hf" / "README.md").unlink()
    (tmp_path / "hf" / "tokenizer.json").rename(tmp_path / "hf" / "mine.json")  # a listed name now absent: fine
    convert(*argv)
    (tmp_path / "empty").mkdir()
    convert("--weight", "full_sft", "--save_dir", tmp_path / "out", "--out", tmp_path / "empty", "--verify", "0")
    assert (tmp_path / "empty" / cm.MARKER).exists()


def test_out_inside_the_repo_sources_is_refused_before_any_write(tmp_path):
    """A fresh clone (a copy of the repo's code in a temp folder): `--out model` run from its root leaves model/
    exactly as it was, and so do the other source folders and the root itself."""
    clone = tmp_path / "clone"
    for folder in ("model", "trainer", "dataset", "util"):
        shutil.copytree(ROOT / folder, clone / folder, ignore=shutil.ignore_patterns("__pycache__", "demo"))
    (clone / "scripts").mkdir()
    shutil.copyfile(ROOT / "scripts" / "convert_model.py", clone / "scripts" / "convert_model.py")
    make_native(tmp_path / "out")
    before = snapshot(clone)
    proc = run_script_in(clone, "--weight", "full_sft", "--save_dir", tmp_path / "out", "--out", "model",
                         tmp=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "is part of this repository's source" in proc.stderr and "model" in proc.stderr
    assert snapshot(clone) == before and sorted(p.name for p in clone.iterdir()) == sorted(
        ["model", "trainer", "dataset", "util", "scripts"])
    for out in ("model", ".", "scripts", "trainer/spine", "docs/new", str(clone / "dataset")):
        for force in ([], ["--overwrite"]):
            message = run_script_in(clone, "--weight", "full_sft", "--save_dir", tmp_path / "out", "--out", out,
                                    *force, tmp=tmp_path, inprocess=True)
            assert "is part of this repository's source" in message, (out, message)
    assert snapshot(clone) == before


def run_script_in(clone: Path, *argv, tmp: Path, inprocess: bool = False):
    """convert_model.py of the clone, run from the clone's root: a subprocess (CompletedProcess) or, for speed,
    its main() with the clone as ROOT and cwd (the UserError's text)."""
    if inprocess:
        import os
        cwd = os.getcwd()
        os.chdir(clone)
        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(cm, "ROOT", clone)
                with pytest.raises(UserError) as e:
                    convert(*argv)
            return str(e.value)
        finally:
            os.chdir(cwd)
    env = script_env(tmp)
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "scripts/convert_model.py", *map(str, argv)], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=120)
