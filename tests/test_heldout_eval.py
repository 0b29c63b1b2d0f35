"""Held-out evaluation of the supervised stages (trainer/spine/evaluate.py) and mfu in the progress line.

    python -m pytest tests/test_heldout_eval.py -q
"""
import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import DEMO, TINY, dirs, read_metrics, run_inprocess, run_script, run_torchrun, signal_after_step
from model.flops import training_flops
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer.spine import evaluate as ev
from trainer.trainer_utils import RunContext, load_tokenizer, root_path

PRE = "trainer/train_pretrain.py"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(root_path("model"))


def cpu_ctx(rank=0, world_size=1):
    return RunContext(device=torch.device("cpu"), rank=rank, local_rank=rank, world_size=world_size,
                      dtype=torch.float32)


def eval_args(**kw):
    base = dict(eval_interval=1, eval_data_path=None, eval_samples=None, default_eval_samples=500, batch_size=2,
                data_path="data.jsonl", skip_bad_lines=0)
    return SimpleNamespace(**{**base, **kw})


def sft_file(tmp_path, n):
    """n small SFT conversations of different lengths (Chinese and English: multi-byte characters)."""
    path = tmp_path / "held.jsonl"
    rows = [{"conversations": [{"role": "user", "content": f"问题 {i}: what is {i} + {i}?"},
                               {"role": "assistant", "content": f"答案是 {2 * i}。" + " ok" * i}]} for i in range(n)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def model_and_data(tmp_path, tok, n=5):
    from dataset.lm_dataset import SFTDataset
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2, headwise_attn_output_gate=True))
    return model, SFTDataset(str(sft_file(tmp_path, n)), tok, max_length=128)


# ------------------------------------------------------------------------------------------------ the numbers

def test_eval_loss_is_the_token_weighted_mean_over_the_held_out_set(tmp_path, tok):
    model, data = model_and_data(tmp_path, tok)
    args = eval_args(eval_data_path=str(data.file.path))
    heldout = ev.lm_heldout(args, cpu_ctx(), model, tok)
    heldout.hold_out(data, None)
    got = heldout(1, last=False)
    # by hand: each conversation alone (no padding), -log p(target) summed over its supervised targets, / count
    nll, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(len(data)):
            item = data[i]
            logp = model(item["input_ids"][None]).logits[0].double().log_softmax(-1)
            for t in range(len(item["input_ids"]) - 1):
                target = int(item["labels"][t + 1])
                if target != -100:
                    nll -= float(logp[t, target])
                    count += 1
    assert count == sum(data[i]["supervised"] for i in range(len(data)))
    assert got["eval_loss"] == pytest.approx(nll / count, rel=1e-5)
    model.train()


def test_bpb_of_a_hand_example(tok):
    text = "你好 world <think>龘</think>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    table, exact = ev.token_bytes(tok, 6400)
    assert exact
    # per-token byte counts add up to the text's UTF-8 length, also where a character is split over tokens
    # 你好 6 + space 1 + world 5 + space 1 + <think> 7 + 龘 3 + </think> 8
    assert sum(int(table[i]) for i in ids) == len(text.encode("utf-8")) == 31
    split = [i for i in ids if tok.decode([i]) == "\ufffd"]
    assert split, "the rare character should be split into byte tokens"  # decoding one alone would miscount
    assert int(table[tok.convert_tokens_to_ids("<|im_end|>")]) == 0 and int(table[3]) == len("<think>")
    # uniform logits: every target costs ln V nats; the special end token is in eval_loss, not in eval_bpb
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    labels = torch.tensor([[-100] + ids + [im_end]])
    logits = torch.zeros(1, labels.shape[1], 6400)
    out = ev.lm_summary({k: float(v) for k, v in ev.lm_sums(logits, labels, table).items()})
    assert out["eval_loss"] == pytest.approx(math.log(6400))
    assert out["eval_bpb"] == pytest.approx(len(ids) * math.log2(6400) / 31)


def test_the_same_sums_on_any_number_of_ranks(tmp_path, tok):
    """Every record is evaluated by exactly one rank; the per-rank sums add up to the one-process sums."""
    model, data = model_and_data(tmp_path, tok, n=7)
    totals = {}
    for world in (1, 3):
        acc = None
        for rank in range(world):
            h = ev.lm_heldout(eval_args(eval_data_path=str(data.file.path)), cpu_ctx(rank, world), model, tok)
            h.summarize = lambda s: s  # the raw sums of this rank
            h.hold_out(data, None)
            s = h.evaluate()
            acc = s if acc is None else {k: acc[k] + s[k] for k in s}
        totals[world] = acc
    assert totals[1]["tokens"] == totals[3]["tokens"] and totals[1]["bytes"] == totals[3]["bytes"]
    assert totals[3]["nll"] == pytest.approx(totals[1]["nll"], rel=1e-6)


def test_dpo_eval_of_a_policy_equal_to_its_reference(tok):
    """Policy = reference: every implicit reward is 0, so the margin is 0, no pair is 'won' and the loss is ln 2."""
    import copy
    from dataset.lm_dataset import DPODataset
    from trainer.train_dpo import heldout_dpo
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2))
    args = eval_args(eval_data_path=str(DEMO / "dpo.jsonl"), eval_samples=6, loss_type="sigmoid_norm", beta=0.1)
    h = heldout_dpo(args, cpu_ctx(), model, copy.deepcopy(model).eval())
    h.hold_out(DPODataset(str(DEMO / "dpo.jsonl"), tok, max_length=128), None)
    got = h.evaluate()
    # the model statistics ride along (the policy's); they do not touch the metrics (the probe only reads)
    assert {"sink_share", "act_max", "layers/sink_share_L1"} <= got.keys()
    got = {k: v for k, v in got.items() if k.startswith("eval_")}
    assert got == {"eval_reward_accuracy": 0.0, "eval_reward_margin": 0.0,
                   "eval_dpo_loss": pytest.approx(math.log(2))}


# ------------------------------------------------------------------------------------------------ the held-out slice

def test_held_out_slice_is_fixed_excluded_and_only_default_on_large_data():
    base = list(range(10_000))
    h = ev.HeldOutEval(eval_args(), cpu_ctx(), None, score=None, keys=(), summarize=None, collate_fn=None)
    train = h.hold_out(_Records(base), None)
    held = ev.heldout_indices(10_000, 500)
    assert h.held_out == {"samples": 500, "records": 10_000} and len(train) == 9_500
    assert sorted(set(train[i] for i in range(len(train))) | set(held)) == base  # disjoint and complete
    assert ev.heldout_indices(10_000, 500) == held  # fixed, whatever the run's --seed
    # 500 is more than 5% of 9,999 records: nothing held out by default; an explicit number is honoured
    assert len(h.hold_out(_Records(base[:9_999]), None)) == 9_999 and h.held_out["samples"] == 0
    h.args.eval_samples = 3
    assert len(h.hold_out(_Records(base[:20]), None)) == 17
    # a resumed run keeps the slice its resume file records (a file from before the record: none)
    assert len(h.hold_out(_Records(base), {"heldout": {"samples": 7, "records": 10_000}})) == 9_993
    assert len(h.hold_out(_Records(base), {})) == 10_000
    h.args.eval_samples = 20
    with pytest.raises(ev.UserError, match="would hold out all 20 records"):
        h.hold_out(_Records(base[:20]), None)


class _Records(list):
    lengths = None


# ------------------------------------------------------------------------------------------------ in the trainers

class TinyObserver:
    """What model statistics plug into: hooks on the decoder layers for the evaluation's forwards only."""
    instances = []

    def __init__(self, model):
        self.model, self.tokens, self.handles = model, [0] * len(model.model.layers), []
        TinyObserver.instances.append(self)

    def __enter__(self):
        for i, layer in enumerate(self.model.model.layers):
            self.handles.append(layer.register_forward_hook(
                lambda m, inp, out, i=i: self.tokens.__setitem__(i, self.tokens[i] + inp[0].shape[:2].numel())))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def all_reduce(self):
        pass

    def summary(self):
        return {"obs_tokens": float(sum(self.tokens)),
                **{f"layers/obs_tokens_L{i}": float(t) for i, t in enumerate(self.tokens)}}


def test_observer_metrics_reach_the_metrics_file_but_per_layer_keys_stay_off_the_progress_line(tmp_path, capsys,
                                                                                             monkeypatch):
    import trainer.trainer_utils as tu
    plain = tu.lm_heldout
    monkeypatch.setattr(tu, "lm_heldout", lambda *a, **k: plain(*a, **k, observer=TinyObserver))
    TinyObserver.instances.clear()
    code, out, err = run_inprocess(PRE, *TINY, *dirs(tmp_path), "--data_path", DEMO / "pretrain.jsonl",
                                   "--batch_size", "4", "--accumulation_steps", "1", "--max_steps", "3",
                                   "--log_interval", "1", "--eval_samples", "6", "--eval_interval", "2",
                                   capsys=capsys)
    assert code == 0, err
    rows = {r["global_step"]: r for r in read_metrics(tmp_path, "pretrain")}
    assert sorted(k for k in rows[2] if "obs" in k) == ["layers/obs_tokens_L0", "layers/obs_tokens_L1", "obs_tokens"]
    assert "obs_tokens" not in rows[1] and "eval_loss" in rows[3]
    # the 6 held-out documents went once through each layer per evaluation (padded batches of 4)
    assert rows[2]["layers/obs_tokens_L0"] == rows[3]["layers/obs_tokens_L1"] > 6
    assert "obs_tokens" in out and "layers/" not in out
    model = TinyObserver.instances[0].model
    assert all(not layer._forward_hooks for layer in model.model.layers)  # removed after each pass
    side = json.loads((tmp_path / "out" / "pretrain_64.json").read_text())
    assert side["eval"]["step"] == 3 and side["eval"]["eval_loss"] == rows[3]["eval_loss"]
    assert "layers/obs_tokens_L0" not in side["eval"]


def test_a_resumed_run_keeps_its_held_out_slice_and_ends_with_the_uninterrupted_weights(tmp_path, capsys,
                                                                                      monkeypatch):
    common = [*TINY, "--data_path", DEMO / "pretrain.jsonl", "--batch_size", "4", "--accumulation_steps", "1",
              "--max_steps", "4", "--log_interval", "1", "--eval_samples", "16", "--eval_interval", "2"]
    code, _, err = run_inprocess(PRE, *common, *dirs(tmp_path / "full"), capsys=capsys)
    assert code == 0, err
    with monkeypatch.context() as m:
        signal_after_step(m, 3)
        code, out, err = run_inprocess(PRE, *common, *dirs(tmp_path / "part"), capsys=capsys)
    assert code == 130 and "stopped at step 3" in out + err
    # another --eval_samples on resume: the run keeps the training set it started with
    code, out, err = run_inprocess(PRE, *common[:-4], "--eval_samples", "8", "--eval_interval", "2", "--from_resume",
                                   "1", *dirs(tmp_path / "part"), capsys=capsys)
    assert code == 0, err
    assert "keeps them (--eval_samples 8 applies to a new run)" in out and "16 of the 5,000 records" in out
    full, part = (torch.load(tmp_path / d / "checkpoints" / "pretrain_64_resume.pth", weights_only=True)
                  for d in ("full", "part"))
    assert all(torch.equal(full["model"][k], part["model"][k]) for k in full["model"])
    assert part["last_eval"] == full["last_eval"] and full["last_eval"]["step"] == 4
    assert [r["eval_loss"] for r in read_metrics(tmp_path / "part", "pretrain") if "eval_loss" in r] == \
        [r["eval_loss"] for r in read_metrics(tmp_path / "full", "pretrain") if "eval_loss" in r]


STATS_KEYS = {"act_max", "gate_mean", "gate_sparsity", "sink_share", "expert_load_cv", "expert_entropy"}
STAGES = {  # script, weight name, data, extra flags, eval keys
    "full_sft": ("trainer/train_full_sft.py", "full_sft", "sft.jsonl", ["--from_weight", "pretrain"],
                 ["eval_bpb", "eval_loss"]),
    "lora": ("trainer/train_lora.py", "lora_identity", "lora_identity.jsonl", ["--from_weight", "pretrain"],
             ["eval_bpb", "eval_loss"]),
    "distill_reason": ("trainer/train_distill_reason.py", "reason", "reason.jsonl", ["--from_weight", "pretrain"],
                       ["eval_bpb", "eval_loss"]),
    "distillation": ("trainer/train_distillation.py", "full_dist", "sft.jsonl",
                     ["--from_student_weight", "pretrain", "--from_teacher_weight", "pretrain"],
                     ["eval_bpb", "eval_loss"]),
    "dpo": ("trainer/train_dpo.py", "dpo", "dpo.jsonl", ["--from_weight", "pretrain"],
            ["eval_dpo_loss", "eval_reward_accuracy", "eval_reward_margin"]),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_supervised_stage_evaluates_and_writes_the_sidecar(stage, tiny_random, tmp_path, capsys):
    script, weight, data, extra, keys = STAGES[stage]
    sizes = ["--student_hidden_size", "64", "--student_num_layers", "2", "--teacher_hidden_size", "64",
             "--teacher_num_layers", "2"] if stage == "distillation" else ["--hidden_size", "64",
                                                                         "--num_hidden_layers", "2"]
    shutil.copytree(tiny_random / "out", tmp_path / "out")  # random tiny pretrain weights: every stage starts there
    out_dir = tmp_path / "out" / ("lora" if stage == "lora" else "")
    where = ["--from_dir", tmp_path / "out", "--save_dir", out_dir] if stage == "lora" else ["--save_dir", out_dir]
    code, out, err = run_inprocess(script, *TINY[4:], *sizes, *where, "--checkpoint_dir", tmp_path / "ckp",
                                   "--data_path", DEMO / data, *extra, "--batch_size", "2", "--max_steps", "2",
                                   "--log_interval", "1", "--eval_samples", "4", "--eval_interval", "1",
                                   "--peak_tflops", "1", capsys=capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "ckp" / f"{weight}_64_metrics.jsonl").read_text().splitlines()]
    assert [sorted(k for k in r if k.startswith("eval_")) for r in rows] == [keys, keys]
    assert all(r["mfu"] > 0 for r in rows) and "held-out evaluation: 4 of the" in out
    # the model statistics ride along by default (the tiny model is gated, dense): summaries and per-layer keys
    stats = ["act_max", "gate_mean", "gate_sparsity", "sink_share"]
    assert [sorted(k for k in r if k in STATS_KEYS) for r in rows] == [stats, stats]
    assert all(f"layers/sink_share_L{i}" in r and f"layers/gate_mean_L{i}" in r for r in rows for i in (0, 1))
    assert 0 < rows[-1]["sink_share"] < 1 and 0 < rows[-1]["gate_mean"] < 1
    assert json.loads((out_dir / f"{weight}_64.json").read_text())["eval"] == {
        "step": 2, **{k: rows[-1][k] for k in keys + stats}}


@pytest.mark.slow
def test_evaluation_does_not_change_the_weights_and_mfu_is_flops_times_tokens_per_s(tmp_path):
    """The same run with and without evaluation passes (the held-out slice is out of training in both) ends with
    identical fp32 weights; with --peak_tflops on a CPU the rows carry mfu = flops_per_token x tokens_per_s / peak."""
    common = [*TINY, "--data_path", DEMO / "pretrain.jsonl", "--batch_size", "4", "--accumulation_steps", "2",
              "--max_steps", "4", "--log_interval", "1", "--eval_samples", "16"]
    run_script(PRE, *common, *dirs(tmp_path / "plain"), "--eval_interval", "0", tmp=tmp_path)
    proc = run_script(PRE, *common, *dirs(tmp_path / "eval"), "--eval_interval", "2", "--peak_tflops", "0.5",
                      tmp=tmp_path)
    states = [torch.load(tmp_path / d / "checkpoints" / "pretrain_64_resume.pth", weights_only=True)
              for d in ("plain", "eval")]
    assert states[0]["heldout"] == states[1]["heldout"] == {"samples": 16, "records": 5000}
    a, b = states[0]["model"], states[1]["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "plan: 4,984 samples" in proc.stdout

    plain, rows = read_metrics(tmp_path / "plain", "pretrain"), read_metrics(tmp_path / "eval", "pretrain")
    assert [r["global_step"] for r in rows if "eval_loss" in r] == [2, 4]
    assert all("eval_loss" not in r and "mfu" not in r and r["tflops"] > 0 for r in plain)  # CPU: no peak, no mfu
    config = MiniMindConfig(hidden_size=64, num_hidden_layers=2, headwise_attn_output_gate=True)
    f = training_flops(config)
    for r in rows:
        assert r["mfu"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / 0.5e12, rel=1e-12)
        width = (r["flops_per_token"] - f.per_token) / f.per_token_seq  # mean row width, in (1, --max_seq_len]
        assert 1 < width <= 128
    assert "mfu" in proc.stdout and "TFLOP/s" in proc.stdout


@pytest.mark.slow
def test_two_processes_give_the_one_process_eval_loss(tmp_path):
    """The same global batch on 1 and 2 processes (4 x 1 vs 2 x 2): the same weights (up to fp32 reduction order),
    so the held-out numbers, summed over the ranks, agree; the slice is the same records."""
    common = [*TINY, "--data_path", DEMO / "pretrain.jsonl", "--accumulation_steps", "1", "--max_steps", "2",
              "--log_interval", "1", "--eval_samples", "11", "--eval_interval", "1", "--pack", "0"]
    run_script(PRE, *common, "--batch_size", "4", *dirs(tmp_path / "one"), tmp=tmp_path)
    run_torchrun(PRE, *common, "--batch_size", "2", *dirs(tmp_path / "two"), tmp=tmp_path)
    one, two = read_metrics(tmp_path / "one", "pretrain"), read_metrics(tmp_path / "two", "pretrain")
    assert [r["global_step"] for r in one] == [r["global_step"] for r in two] == [1, 2]
    for a, b in zip(one, two):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
        assert b["eval_bpb"] == pytest.approx(a["eval_bpb"], rel=1e-5)
