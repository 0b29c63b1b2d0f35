"""llama.cpp (through llama-cpp-python) runs the GGUF files of scripts/convert_model.py --format gguf token for token
like this repo's greedy generate.

    python -m pytest tests/test_deploy_gguf.py -q      (slow: the first run creates .venv-gguf, compiling llama.cpp)

What is shown: a dense gate-off model exported as f32 and f16 (llama architecture) and a gate-off MoE model with a
shared expert as f32 (bailingmoe, whose layer is MiniMind's exactly) give, in llama.cpp, the same greedy tokens as
generate() (for f16: generate() of the same model with its weights rounded to fp16); the chat template embedded in the
GGUF, rendered the way llama-cpp-python renders it for create_chat_completion, is the repo's prompt, and llama.cpp's
tokenizer gives the same ids; a model that answers two tokens and <|im_end|> stops there in create_chat_completion
(finish_reason "stop"); bf16 and q8_0 files load and generate; gated models are refused with one line.
"""
import json
import subprocess

import pytest
import torch

from conftest import run_script, script_env
from deploy_env import CHAIN_REPLY, CONVERSATIONS, engine_python, make_chain_model, repo_replies
from test_convert import cm, make_native
from trainer.trainer_utils import UserError

MAX_NEW = 12

DRIVER = r"""
import json, sys
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
job = json.load(open(sys.argv[1]))
res = {}
for name, path in job["files"].items():
    # an f32 KV cache (llama.cpp defaults to f16, which rounds K and V): the comparison is then fp32 throughout
    llm = Llama(model_path=path, n_ctx=256, n_threads=2, verbose=False, seed=0, type_k=0, type_v=0)
    # how create_chat_completion renders a GGUF's own template when no chat_format is given
    fmt = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"],
                              eos_token=llm.detokenize([llm.token_eos()], special=True).decode(),
                              bos_token=llm.detokenize([llm.token_bos()], special=True).decode())
    r = {"arch": llm.metadata["general.architecture"], "prompts": [], "prompt_ids": [], "tokens": [], "chat": []}
    for messages in job["conversations"]:
        prompt = fmt(messages=messages).prompt
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        out = []
        for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            out.append(tok)
            if llm.token_eos() == tok or len(out) == job["max_new"]:
                break
        r["prompts"].append(prompt)
        r["prompt_ids"].append(ids)
        r["tokens"].append(out)
        c = llm.create_chat_completion(messages, temperature=0.0, top_k=1, max_tokens=job["max_new"], seed=0)
        r["chat"].append([c["choices"][0]["message"]["content"], c["choices"][0]["finish_reason"]])
    res[name] = r
json.dump(res, open(sys.argv[2], "w"))
"""


def export_gguf(tmp, weight, moe, dtype, save_dir=None):
    out = tmp / f"{weight}_{dtype}.gguf"
    proc = run_script("scripts/convert_model.py", "--weight", weight, "--save_dir", save_dir or tmp / "native",
                      "--use_moe", int(moe), "--format", "gguf", "--dtype", dtype, "--out", out, tmp=tmp)
    assert "verified:" in proc.stdout, proc.stdout
    return str(out)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    python = engine_python("gguf")
    tmp = tmp_path_factory.mktemp("gguf")
    make_native(tmp / "native", weight="dense", seed=1)
    make_native(tmp / "native", moe=True, weight="moe", seed=2)
    make_chain_model(tmp / "chain")
    files = {"dense_fp32": export_gguf(tmp, "dense", False, "fp32"), "dense_fp16": export_gguf(tmp, "dense", False, "fp16"),
             "moe_fp32": export_gguf(tmp, "moe", True, "fp32"), "chain_fp32": export_gguf(tmp, "full_sft", False, "fp32", tmp / "chain"),
             "dense_bf16": export_gguf(tmp, "dense", False, "bf16"), "dense_q8_0": export_gguf(tmp, "dense", False, "q8_0")}
    job = {"files": files, "conversations": CONVERSATIONS, "max_new": MAX_NEW}
    (tmp / "job.json").write_text(json.dumps(job))
    (tmp / "driver.py").write_text(DRIVER)
    env = script_env(tmp)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([python, str(tmp / "driver.py"), str(tmp / "job.json"), str(tmp / "res.json")], cwd=tmp,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return tmp, json.loads((tmp / "res.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name,weight,arch", [("dense_fp32", "dense", "llama"), ("dense_fp16", "dense", "llama"),
                                              ("moe_fp32", "moe", "bailingmoe")])
def test_llama_cpp_greedy_tokens_equal_repo_generate(llama_run, name, weight, arch):
    tmp, res = llama_run
    got = res[name]
    assert got["arch"] == arch
    # the native .pth is fp16 (training's convention), so the repo's fp32 generate already runs the f16 weights
    want, _ = repo_replies(tmp / "native", weight, CONVERSATIONS, MAX_NEW)
    assert got["prompts"] == [text for text, _, _ in want]
    assert got["prompt_ids"] == [ids for _, ids, _ in want]
    assert got["tokens"] == [reply for _, _, reply in want]
    assert all(len(reply) == MAX_NEW for _, _, reply in want)


@pytest.mark.slow
def test_llama_cpp_chat_completion_stops_at_im_end(llama_run):
    tmp, res = llama_run
    want, tok = repo_replies(tmp / "chain", "full_sft", CONVERSATIONS, MAX_NEW)
    assert [reply for _, _, reply in want] == [CHAIN_REPLY] * len(CONVERSATIONS)
    assert res["chain_fp32"]["tokens"] == [CHAIN_REPLY] * len(CONVERSATIONS)
    text = tok.decode(CHAIN_REPLY, skip_special_tokens=True)
    assert res["chain_fp32"]["chat"] == [[text, "stop"]] * len(CONVERSATIONS)


@pytest.mark.slow
def test_bf16_and_q8_0_files_run(llama_run):
    """Rounded weights may pick other tokens than the fp32 reference; they must load and answer MAX_NEW tokens."""
    _, res = llama_run
    for name in ("dense_bf16", "dense_q8_0"):
        assert res[name]["arch"] == "llama"
        assert [len(t) for t in res[name]["tokens"]] == [MAX_NEW] * len(CONVERSATIONS)


# ----------------------------------------------------------------------------------------------------------------------
# The writer alone (in process, no engine)


def test_gguf_file_holds_the_tokenizer_template_and_permuted_weights(tmp_path):
    import gguf
    make_native(tmp_path / "native", weight="dense")
    out = tmp_path / "m.gguf"
    cm.main(["--weight", "dense", "--save_dir", str(tmp_path / "native"), "--format", "gguf", "--dtype", "fp32",
             "--out", str(out)])
    r = gguf.GGUFReader(str(out))
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("tokenizer.ggml.model") == "gpt2"
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")) == (1, 2)
    assert field("tokenizer.ggml.add_bos_token") is False
    tok = json.loads((cm.ROOT / "model" / "tokenizer_config.json").read_text())
    assert field("tokenizer.chat_template") == tok["chat_template"]
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == 6400 and tokens[2] == "<|im_end|>" and tokens[209] == "\u010a"  # byte-level "\n"
    # q/k rows: each head's two rotate-half halves interleaved pairwise (llama.cpp's RoPE layout)
    sd = torch.load(tmp_path / "native" / "dense_64.pth", weights_only=True)
    q = sd["model.layers.0.self_attn.q_proj.weight"].float()
    t = {x.name: x for x in r.tensors}["blk.0.attn_q.weight"]
    got = torch.from_numpy(t.data.copy()).reshape(64, 64)
    head0 = q[:16]
    assert torch.equal(got[0], head0[0]) and torch.equal(got[1], head0[8]) and torch.equal(got[2], head0[1])
    assert torch.equal(got[16:], cm.gguf_permute(q, 4)[16:])


@pytest.mark.parametrize("flags,reason", [(["--use_moe", "1"], "head-wise attention output gate"),
                                          (["--inference_rope_scaling"], "YaRN")])
def test_gguf_refuses_what_llama_cpp_cannot_compute(tmp_path, flags, reason):
    gated = "--use_moe" in flags
    make_native(tmp_path / "native", moe=gated, gate=gated, weight="m")
    with pytest.raises(UserError, match=reason) as e:
        cm.main(["--weight", "m", "--save_dir", str(tmp_path / "native"), *flags, "--format", "gguf",
                 "--out", str(tmp_path / "m.gguf")])
    assert "\n" not in str(e.value) and not (tmp_path / "m.gguf").exists()
    if gated:
        assert "vllm serve" in str(e.value)


def test_gguf_out_keeps_the_output_guards_of_convert(tmp_path):
    """--format gguf writes one file, never into the repo's sources and never over a file that is not a GGUF."""
    make_native(tmp_path / "native", weight="d")
    base = ["--weight", "d", "--save_dir", str(tmp_path / "native"), "--format", "gguf"]
    target = cm.ROOT / "model" / "x.gguf"
    with pytest.raises(UserError, match="inside this repository's source"):
        cm.main([*base, "--out", str(target)])
    assert not target.exists()
    mine = tmp_path / "notes.txt"
    mine.write_text("the user's own file")
    with pytest.raises(UserError, match="not a GGUF file"):
        cm.main([*base, "--out", str(mine)])
    assert mine.read_text() == "the user's own file"
