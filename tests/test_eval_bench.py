"""scripts/eval_bench.py: the scorer against a stub that always answers A, prompt rendering, split choice, batching
against single prompts, the CLI on a real tiny checkpoint, and (slow, when installed) parity with lm_eval.

    python -m pytest tests/test_eval_bench.py -q
"""
import csv
import importlib.util
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, run_script, script_env

SAMPLE = ROOT / "dataset" / "bench_sample"
spec = importlib.util.spec_from_file_location("eval_bench", ROOT / "scripts" / "eval_bench.py")
eb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eb)

# the sample's subjects and their categories as the benchmarks publish them
CATEGORIES = {
    "ceval": {"computer_network": ["STEM"], "high_school_geography": ["Social Science"],
              "high_school_history": ["Humanities"], "sports_science": ["Other"]},
    "cmmlu": {"elementary_mathematics": ["STEM"], "economics": ["Social Science"],
              "chinese_history": ["Humanities", "China specific"], "agronomy": ["Other"]},
}


@pytest.fixture(scope="module")
def tokenizer():
    from trainer.trainer_utils import load_tokenizer
    return load_tokenizer(str(ROOT / "model"))


class AlwaysA(torch.nn.Module):
    """A 'model' whose next token is always the letter A; it checks the batches it gets are left-padded."""
    def __init__(self, tokenizer):
        super().__init__()
        self.config = SimpleNamespace(model_type="stub", max_position_embeddings=4096)
        self.a = tokenizer.convert_tokens_to_ids("A")
        self.vocab = len(tokenizer)
        self.calls, self.padded = [], 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0):
        if attention_mask is not None:  # a batch with padding: left-padded, positions counted from the first token
            assert bool(attention_mask[:, -1].all()) and not bool(attention_mask.all())
            assert torch.equal(position_ids, (attention_mask.cumsum(-1) - 1).clamp(min=0))
            self.padded += 1
        self.calls.append(tuple(input_ids.shape))
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        logits[..., self.a] = 5.0
        return SimpleNamespace(logits=logits)


def expected_always_a(bench: str) -> dict:
    """Accuracy of always answering A, from the answer columns of the scored split (read here with csv)."""
    split, pattern = ("val", "*_val.csv") if bench == "ceval" else ("test", "*.csv")
    per = {}
    for path in sorted((SAMPLE / bench / split).glob(pattern)):
        with open(path, encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        answers = [r.get("answer") or r.get("Answer") for r in rows]
        name = path.name[:-len("_val.csv")] if bench == "ceval" else path.stem
        per[name] = (answers.count("A"), len(answers))
    return per


@pytest.mark.parametrize("bench", ["ceval", "cmmlu"])
def test_always_a_stub_scores_exactly(bench, tokenizer, tmp_path, monkeypatch, capsys):
    stub = AlwaysA(tokenizer)
    monkeypatch.setattr(eb, "load_model", lambda args: (stub, tokenizer))
    out = tmp_path / "r.json"
    eb.main(["--data_dir", str(SAMPLE / bench), "--json", str(out), "--batch_size", "3", "--shots", "1",
             "--device", "cpu"])
    res = json.loads(out.read_text())
    per = expected_always_a(bench)
    assert set(res["subjects"]) == set(per)
    for name, (a, n) in per.items():
        r = res["subjects"][name]
        assert (r["correct"], r["total"]) == (a, n)
        assert r["acc"] == pytest.approx(a / n)
        assert r["preds"] == "A" * n and r["categories"] == CATEGORIES[bench][name]
    for cat in {c for cats in CATEGORIES[bench].values() for c in cats}:
        names = [s for s, cats in CATEGORIES[bench].items() if cat in cats]
        got = res["categories"][cat]
        assert got["correct"] == sum(per[s][0] for s in names) and got["total"] == sum(per[s][1] for s in names)
        assert got["macro_acc"] == pytest.approx(sum(per[s][0] / per[s][1] for s in names) / len(names))
    correct, total = sum(a for a, _ in per.values()), sum(n for _, n in per.values())
    assert res["overall"]["acc"] == pytest.approx(correct / total)
    assert res["overall"]["macro_acc"] == pytest.approx(sum(a / n for a, n in per.values()) / len(per))
    assert res["random_guess"] == 0.25 and res["template"] == "chat" and res["shots"] == 1
    # batches of 3, longest prompts first; the table shows overall micro and macro with 25% beside them
    assert [c[0] for c in stub.calls] == [3] * (total // 3) + ([total % 3] if total % 3 else [])
    widths = [c[1] for c in stub.calls]
    assert widths == sorted(widths, reverse=True) and stub.padded > 0
    table = capsys.readouterr().out
    overall = next(line for line in table.splitlines() if line.startswith("Overall"))
    assert overall.split()[1:] == [str(total), f"{100 * correct / total:.2f}",
                                   f"{100 * res['overall']['macro_acc']:.2f}", "25.00"]


def test_scores_the_split_with_answers(tokenizer):
    assert eb.detect_benchmark(SAMPLE / "ceval") == "ceval"
    assert eb.detect_benchmark(SAMPLE / "cmmlu") == "cmmlu"
    with pytest.raises(eb.UserError, match="pass --data_dir .*ceval"):
        eb.detect_benchmark(SAMPLE)
    subs = eb.load_benchmark(SAMPLE / "ceval", eb.BENCHES["ceval"], None, None, 0)
    net = next(s for s in subs if s.name == "computer_network")
    # val (5 answered questions), not test (2 unanswered ones)
    assert [r["answer"] for r in net.items] == list("ABCDA") and net.dev == []
    subs = eb.load_benchmark(SAMPLE / "cmmlu", eb.BENCHES["cmmlu"], ["economics"], 2, 5)
    assert len(subs) == 1 and len(subs[0].items) == 2 and len(subs[0].dev) == 2  # --limit; only 2 dev rows exist
    assert subs[0].items[0]["question"] == "通货膨胀是指" and subs[0].items[0]["A"] == "一般物价水平持续上涨"


def test_prompts_render_as_published(tokenizer):
    ceval, cmmlu = eb.BENCHES["ceval"], eb.BENCHES["cmmlu"]
    net = next(s for s in eb.load_benchmark(SAMPLE / "ceval", ceval, ["computer_network"], None, 2))
    raw = eb.render_prompt(ceval, net, net.dev, net.items[1], "raw")
    assert raw == ("以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
                   "在 TCP/IP 模型中，IP 协议工作在哪一层？\nA. 应用层\nB. 传输层\nC. 网络层\nD. 链路层\n答案：C\n\n"
                   "HTTP 协议默认使用的 TCP 端口号是\nA. 80\nB. 21\nC. 25\nD. 53\n答案：A\n\n"
                   "IPv4 地址的长度是多少位？\nA. 16\nB. 32\nC. 64\nD. 128\n答案：")
    chat = eb.render_prompt(ceval, net, net.dev[:1], net.items[1], "chat", tokenizer)
    assert chat == ("<|im_start|>user\n以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
                    "在 TCP/IP 模型中，IP 协议工作在哪一层？\nA. 应用层\nB. 传输层\nC. 网络层\nD. 链路层\n"
                    "答案：<|im_end|>\n"
                    "<|im_start|>assistant\nC<|im_end|>\n"
                    "<|im_start|>user\nIPv4 地址的长度是多少位？\nA. 16\nB. 32\nC. 64\nD. 128\n答案：<|im_end|>\n"
                    "<|im_start|>assistant\n")
    think = eb.render_prompt(ceval, net, [], net.items[1], "chat", tokenizer, empty_think=True)
    assert think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    econ = next(s for s in eb.load_benchmark(SAMPLE / "cmmlu", cmmlu, ["economics"], None, 1))
    assert eb.render_prompt(cmmlu, econ, econ.dev, econ.items[3], "raw") == (
        "以下是关于经济学的单项选择题，请直接给出正确答案的选项。\n\n"
        "题目：在其他条件不变时，一种商品的价格上升，它的需求量通常会\n"
        "A. 上升\nB. 下降\nC. 不变\nD. 先升后降\n答案是：B\n\n"
        "题目：下列税种中属于直接税的是\nA. 增值税\nB. 个人所得税\nC. 消费税\nD. 关税\n答案是：")
    # raw prompts start with BOS (as pretraining samples did); the letters are the bare tokens that follow "答案："
    ids = eb.encode(tokenizer, raw, "raw", bos=True)
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids[1:]) == raw
    letters = eb.letter_token_ids(tokenizer, raw, "raw", "exact")
    assert letters == [[tokenizer.convert_tokens_to_ids(L)] for L in "ABCD"]
    assert tokenizer("答案：C").input_ids[-1] == letters[2][0]
    assert eb.letter_token_ids(tokenizer, chat, "chat", "exact") == letters
    both = eb.letter_token_ids(tokenizer, raw, "raw", "max")
    assert all(len(v) == 2 and tokenizer.convert_tokens_to_ids("Ġ" + L) in v for v, L in zip(both, "ABCD"))


def test_long_prompts_lose_shots_from_the_left(tokenizer):
    ceval = eb.BENCHES["ceval"]
    net = next(s for s in eb.load_benchmark(SAMPLE / "ceval", ceval, ["computer_network"], None, 2))
    row = net.items[0]
    full, cut = eb.build_prompt(tokenizer, ceval, net, row, net.dev, "raw", 4096, True, False)
    one = eb.encode(tokenizer, eb.render_prompt(ceval, net, net.dev[1:], row, "raw"), "raw", True)
    assert not cut and len(one) < len(full)
    got, cut = eb.build_prompt(tokenizer, ceval, net, row, net.dev, "raw", len(full) - 1, True, False)
    assert cut and got == one  # the first (leftmost) dev example went, the second stayed
    got, cut = eb.build_prompt(tokenizer, ceval, net, row, net.dev, "raw", 12, True, False)
    zero = eb.encode(tokenizer, eb.render_prompt(ceval, net, [], row, "raw"), "raw", True)
    assert cut and len(got) == 12 and got[0] == tokenizer.bos_token_id and got[1:] == zero[-11:]


def test_batched_left_padding_equals_one_at_a_time(tiny_sft, tokenizer):
    """Real models: a left-padded batch gives each prompt the log-probs it gets alone (MiniMind derives positions
    from the mask; a Llama gets position ids from the script)."""
    import argparse

    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.chat_utils import add_model_args, load_model
    p = argparse.ArgumentParser()
    add_model_args(p)
    minimind, _ = load_model(p.parse_args(["--weight", "full_sft", "--save_dir", str(tiny_sft / "out")]))
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         initializer_range=0.2))
    subs = eb.load_benchmark(SAMPLE / "cmmlu", eb.BENCHES["cmmlu"], None, None, 1)
    prompts = [eb.build_prompt(tokenizer, eb.BENCHES["cmmlu"], s, r, s.dev, "raw", 2048, True, False)[0]
               for s in subs for r in s.items]
    assert len({len(x) for x in prompts}) > 5  # really different lengths, so real padding
    letters = eb.letter_token_ids(tokenizer, "答案是：", "raw", "exact")
    for model in (minimind.eval(), llama.eval()):
        batched = eb.letter_logprobs(model, prompts, letters, 16, torch.device("cpu"))
        single = eb.letter_logprobs(model, prompts, letters, 1, torch.device("cpu"))
        assert torch.allclose(batched, single, atol=1e-4), (batched - single).abs().max()
        assert (batched < 0).all()


def test_cli_on_tiny_checkpoint(tiny_sft, tmp_path):
    out = tmp_path / "r.json"
    proc = run_script("scripts/eval_bench.py", "--weight", "full_sft", "--save_dir", tiny_sft / "out", "--data_dir",
                      SAMPLE / "cmmlu", "--shots", "2", "--device", "cpu", "--json", out, tmp=tmp_path)
    res = json.loads(out.read_text())
    assert res["benchmark"] == "cmmlu" and res["split"] == "test" and res["template"] == "chat"
    total = correct = 0
    for r in res["subjects"].values():
        assert len(r["preds"]) == len(r["answers"]) == r["total"] == len(r["letter_logprobs"])
        assert r["correct"] == sum(p == a for p, a in zip(r["preds"], r["answers"]))
        # the prediction is the letter with the highest log-prob
        assert r["preds"] == "".join("ABCD"[max(range(4), key=lp.__getitem__)] for lp in r["letter_logprobs"])
        total, correct = total + r["total"], correct + r["correct"]
    assert res["overall"]["total"] == total == 16 and res["overall"]["correct"] == correct
    assert "China specific" in res["categories"] and "questions/s" in proc.stdout and "25.00" in proc.stdout
    # pretrain weights default to raw prompts (in-process: same CLI parser, no second interpreter start)
    res = eb.main(["--weight", "pretrain", "--save_dir", str(tiny_sft / "out"), "--data_dir", str(SAMPLE / "ceval"),
                   "--device", "cpu", "--limit", "2"])
    assert res["template"] == "raw" and res["overall"]["total"] == 8


def test_bad_data_is_reported_with_file_and_line(tmp_path, tokenizer):
    for split in ("dev", "val"):
        (tmp_path / split).mkdir()
    (tmp_path / "val" / "law_val.csv").write_text("id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n1,q,a,b,c,d,E\n",
                                                  encoding="utf-8")
    with pytest.raises(eb.UserError, match=r"law_val.csv line 3: answer 'E'"):
        eb.main(["--data_dir", str(tmp_path)])
    (tmp_path / "val" / "law_val.csv").write_text("id,question,A,B,C\n0,q,a,b,c\n", encoding="utf-8")
    with pytest.raises(eb.UserError, match=r"lacks column\(s\) \['d', 'answer'\]"):
        eb.main(["--data_dir", str(tmp_path)])
    with pytest.raises(eb.UserError, match="not found"):
        eb.main(["--data_dir", str(tmp_path / "nope")])
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "eval_bench.py"), "--data_dir", str(tmp_path)],
                          capture_output=True, text=True, env=script_env(tmp_path), timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "lacks column" in proc.stderr


@pytest.mark.slow
def test_lm_eval_on_a_converted_llama_folder_agrees(tmp_path, tokenizer):
    """`lm_eval --model hf` on a folder written by scripts/convert_model.py (--format llama) with the task files
    eval_bench writes gives the same letter log-probs, predictions and accuracy as eval_bench on that folder (1-shot,
    raw prompts)."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        pytest.skip("lm_eval is not installed (pip install -r requirements-dev.txt); it is optional, not in "
                    "requirements.txt")
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    spec = importlib.util.spec_from_file_location("convert_model", ROOT / "scripts" / "convert_model.py")
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    torch.manual_seed(0)
    native = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2, headwise_attn_output_gate=False,
                                                initializer_range=0.2))
    folder = convert.export_model(native, tokenizer, tmp_path / "llama", fmt="llama", dtype=torch.float32)
    ours = eb.main(["--load_from", str(folder), "--data_dir", str(SAMPLE / "ceval"), "--shots", "1", "--template",
                    "raw", "--device", "cpu", "--dtype", "float32"])
    eb.main(["--data_dir", str(SAMPLE / "ceval"), "--lm_eval_tasks", str(tmp_path / "tasks")])
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={folder},add_bos_token=True,dtype=float32", "--include_path", str(tmp_path / "tasks"),
           "--tasks", "minimind_ceval", "--num_fewshot", "1", "--device", "cpu", "--batch_size", "4",
           "--output_path", str(tmp_path / "lm_out"), "--log_samples"]
    env = {**script_env(tmp_path), "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf_cache")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name, r in ours["subjects"].items():
        files = list((tmp_path / "lm_out").rglob(f"samples_minimind_ceval_{name}_*.jsonl"))
        assert len(files) == 1, files
        rows = sorted((json.loads(line) for line in files[0].read_text().splitlines()), key=lambda x: int(x["doc_id"]))
        theirs = [[float(resp[0]) for resp in row["filtered_resps"]] for row in rows]
        assert torch.allclose(torch.tensor(theirs), torch.tensor(r["letter_logprobs"]), atol=2e-3)
        assert "".join("ABCD"[max(range(4), key=lp.__getitem__)] for lp in theirs) == r["preds"]
    results = json.loads(next((tmp_path / "lm_out").rglob("results_*.json")).read_text())["results"]
    assert results["minimind_ceval"]["acc,none"] == pytest.approx(ours["overall"]["acc"])
