"""--fsdp 1 (FSDP2 fully_shard) on 2 CPU processes (gloo): the same losses and weights as DDP, resume across a DDP <->
FSDP switch and a world-size change, the saved .pth loads in eval_llm and converts; LoRA refuses it.

    python -m pytest tests/test_fsdp.py -q

All 2-process runs share one torchrun launch (tests/grad_probe.py runs them one after another).
"""
import json
import shutil

import pytest
import torch

from conftest import DEMO, TINY, read_metrics, run_eval_cli, run_inprocess, run_script, run_torchrun

PRE = "trainer/train_pretrain.py"
SFT = "trainer/train_full_sft.py"
DPO = "trainer/train_dpo.py"
# MoE + gate, accumulation 2 (FSDP's no-sync micro-step), lr high enough that a resume that lost the optimizer state
# would move the weights by ~1e-3
PRE_ARGS = [*TINY, "--use_moe", "1", "--data_path", DEMO / "pretrain.jsonl", "--batch_size", "4",
            "--accumulation_steps", "2", "--learning_rate", "1e-3", "--log_interval", "1", "--save_interval", "2"]
SFT_ARGS = [*TINY, "--data_path", DEMO / "sft.jsonl", "--from_weight", "none", "--batch_size", "4",
            "--accumulation_steps", "2", "--learning_rate", "1e-3", "--log_interval", "1", "--max_steps", "3"]


def where(tmp, name):
    return ["--save_dir", tmp / name / "out", "--checkpoint_dir", tmp / name / "checkpoints"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One torchrun launch, 2 processes: DDP and FSDP pretraining (4 steps); the DDP checkpoint resumed to step 6
    as DDP and as FSDP (each from a copy); DDP and FSDP SFT (FSDP with --grad_checkpointing 1); FSDP DPO."""
    tmp = tmp_path_factory.mktemp("fsdp")
    jobs = [
        {"script": PRE, "args": [*PRE_ARGS, *where(tmp, "ddp"), "--max_steps", "4"]},
        {"script": PRE, "args": [*PRE_ARGS, *where(tmp, "fsdp"), "--max_steps", "4", "--fsdp", "1"]},
        {"script": PRE, "args": [*PRE_ARGS, *where(tmp, "ddp_to_fsdp"), "--max_steps", "6", "--fsdp", "1",
                                 "--from_resume", "1"], "copy": [str(tmp / "ddp"), str(tmp / "ddp_to_fsdp")]},
        {"script": PRE, "args": [*PRE_ARGS, *where(tmp, "ddp_on"), "--max_steps", "6", "--from_resume", "1"],
         "copy": [str(tmp / "ddp"), str(tmp / "ddp_on")]},
        {"script": SFT, "args": [*SFT_ARGS, *where(tmp, "sft_ddp")]},
        {"script": SFT, "args": [*SFT_ARGS, *where(tmp, "sft_fsdp"), "--fsdp", "1", "--grad_checkpointing", "1"]},
        {"script": DPO, "args": [*TINY, *where(tmp, "sft_fsdp"), "--data_path", DEMO / "dpo.jsonl", "--batch_size",
                                 "2", "--max_steps", "2", "--log_interval", "1", "--learning_rate", "1e-4",
                                 "--fsdp", "1"]},
    ]
    for j in jobs:
        j["args"], j["grads"] = list(map(str, j["args"])), None
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    log = run_torchrun("tests/grad_probe.py", tmp / "jobs.json", tmp=tmp, timeout=500)
    return tmp, log


def resume_file(tmp, name, weight):
    return torch.load(tmp / name / "checkpoints" / f"{weight}_resume.pth", weights_only=True)


def assert_same_run(tmp, a, b, weight, steps):
    """Losses, LR and grad norm of every logged step and the final fp32 weights and AdamW moments agree within fp32
    reduction-order noise (a resume that lost the optimizer state or the data position is off by ~1e-3)."""
    ra = read_metrics(tmp / a, weight.split("_64")[0], moe="_moe" in weight)
    rb = read_metrics(tmp / b, weight.split("_64")[0], moe="_moe" in weight)
    assert [r["global_step"] for r in ra] == [r["global_step"] for r in rb] == steps
    for x, y in zip(ra, rb):
        assert x["samples"] == y["samples"] and x["lr"] == y["lr"]
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6), (x["global_step"], x["loss"], y["loss"])
        # the fp32 norm kernel sums a whole tensor (DDP) or its shards (FSDP): ~1e-5 apart on the embedding
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
    ca, cb = resume_file(tmp, a, weight), resume_file(tmp, b, weight)
    assert ca["opt_step"] == cb["opt_step"] == steps[-1] and ca["samples"] == cb["samples"]
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        torch.testing.assert_close(cb["model"][k], ca["model"][k], rtol=0, atol=2e-6, msg=k)
    sa, sb = ca["optimizer"][""]["state"], cb["optimizer"][""]["state"]
    assert sa.keys() == sb.keys() and "model.layers.0.self_attn.q_proj.weight" in sa  # keyed by name
    for k in sa:  # the moments see the clipping factor 1/grad_norm, so they inherit its ~5e-5 noise
        assert sb[k]["step"] == sa[k]["step"] == steps[-1]
        for m in ("exp_avg", "exp_avg_sq"):
            assert (sb[k][m] - sa[k][m]).norm() <= 5e-4 * sa[k][m].norm(), (k, m)
    return ca, cb


@pytest.mark.slow
def test_fsdp_pretrain_and_sft_equal_ddp_and_dpo_runs(runs):
    tmp, log = runs
    assert log.count("weights identical on all 2 ranks") == 3  # the DDP runs check their replicas; FSDP has none
    assert_same_run(tmp, "ddp", "fsdp", "pretrain_64_moe", steps=[1, 2, 3, 4])
    assert_same_run(tmp, "sft_ddp", "sft_fsdp", "full_sft_64", steps=[1, 2, 3])
    # DPO under FSDP: the unsharded frozen reference equals the sharded policy at step 1 (loss log 2 exactly)
    rows = read_metrics(tmp / "sft_fsdp", "dpo")
    assert [r["global_step"] for r in rows] == [1, 2]
    assert rows[0]["dpo_loss"] == pytest.approx(0.6931471805599453, abs=1e-6) and rows[0]["reward_margin"] == 0
    assert rows[1]["reward_margin"] != 0  # and the policy moved


@pytest.mark.slow
def test_resume_switches_ddp_fsdp_and_world_size(runs, tmp_path, capsys):
    tmp, log = runs
    # DDP -> FSDP on the same 2 ranks continues as DDP would have
    assert_same_run(tmp, "ddp_on", "ddp_to_fsdp", "pretrain_64_moe", steps=[1, 2, 3, 4, 5, 6])
    # FSDP on 2 ranks -> 1 process without FSDP; accumulation 2 x 2 ranks = 4 x 1: the same samples per step
    shutil.copytree(tmp / "fsdp", tmp_path / "one")
    args = [*PRE_ARGS, *where(tmp_path, "one"), "--max_steps", "6", "--from_resume", "1", "--accumulation_steps", "4"]
    code, out, err = run_inprocess(PRE, *args, capsys=capsys)
    assert code == 0, err
    assert "saved with world size 2, now 1" in out
    shutil.copytree(tmp / "ddp_on", tmp_path / "ddp_on")
    assert_same_run(tmp_path, "ddp_on", "one", "pretrain_64_moe", steps=[1, 2, 3, 4, 5, 6])


@pytest.mark.slow
def test_fsdp_weights_are_the_trained_ones_load_in_eval_llm_and_convert(runs, tmp_path, monkeypatch, capsys):
    tmp, _ = runs
    out = tmp / "sft_fsdp" / "out"
    # the .pth is the gathered full model in fp16 (not rank 0's shards), equal to the resume file's fp32 weights
    weights = torch.load(out / "full_sft_64.pth", weights_only=True)
    full = resume_file(tmp, "sft_fsdp", "full_sft_64")["model"]
    assert weights.keys() == full.keys()
    for k in full:
        assert weights[k].dtype == torch.float16 and torch.equal(weights[k], full[k].half()), k
    assert json.loads((out / "full_sft_64.json").read_text())["step"] == 3
    code, stdout, stderr = run_eval_cli(["--save_dir", str(out), "--weight", "full_sft", "--device", "cpu",
                                         "--temperature", "0", "--max_new_tokens", "4", "--prompts", "hi"],
                                        monkeypatch, capsys)
    assert code == 0 and "tok/s]" in stdout, stderr
    proc = run_script("scripts/convert_model.py", "--weight", "full_sft", "--save_dir", out, "--format", "hf",
                      "--dtype", "fp32", "--out", tmp_path / "hf", tmp=tmp_path)
    assert "verified: max |Δlogits| = 0 " in proc.stdout, proc.stdout


def test_lora_refuses_fsdp(tmp_path, capsys):
    code, out, err = run_inprocess("trainer/train_lora.py", *TINY, "--save_dir", tmp_path / "out",
                                   "--checkpoint_dir", tmp_path / "ck", "--from_weight", "none",
                                   "--data_path", DEMO / "lora_identity.jsonl", "--fsdp", "1", capsys=capsys)
    assert code == 1 and "Traceback" not in err
    assert "--fsdp 1 is for stages that train the whole model" in err and "stays on DDP" in err
