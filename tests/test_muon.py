"""--optimizer muon: which parameters Muon takes, what one step does, exact resume, and the refusals.

    python -m pytest tests/test_muon.py -q
"""
import shutil
import sys

import pytest
import torch

from conftest import DEMO, ROOT, TINY, dirs, run_inprocess, run_script, run_torchrun, run_until_sigint
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer.spine.optim import MuonAdamW, build_optimizer, muon_parameter_names

PRE = "trainer/train_pretrain.py"


def test_muon_takes_the_decoder_matrices_adamw_the_embedding_norms_router_and_value_head():
    config = MiniMindConfig(hidden_size=64, num_hidden_layers=2, use_moe=True, headwise_attn_output_gate=True)
    model = MiniMindForCausalLM(config)
    hidden = set()
    for i in range(2):
        layer = f"model.layers.{i}."
        hidden |= {f"{layer}self_attn.{p}_proj.weight" for p in "qkvo"}
        for e in ("experts.0", "experts.1", "experts.2", "experts.3", "shared_experts.0"):
            hidden |= {f"{layer}mlp.{e}.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert muon_parameter_names(model) == hidden
    assert model.model.layers[0].self_attn.q_proj.weight.shape[0] == 64 + 8  # the gate's widened q_proj is in

    opt = build_optimizer(model, 1e-3, 0.1, kind="muon")
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_group, decay, no_decay = ([names[id(p)] for p in g["params"]] for g in opt.param_groups)
    assert set(muon_group) == hidden and opt.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    assert opt.param_groups[0]["weight_decay"] == 0.1
    # the AdamW half: the router is a matrix (decayed); embedding (tied to lm_head) and norms are not decayed
    assert set(decay) == {"model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"}
    assert "model.embed_tokens.weight" in no_decay and "model.norm.weight" in no_decay
    assert len(muon_group) + len(decay) + len(no_decay) == len(names)  # every parameter once (lm_head is tied)

    sys.path.insert(0, str(ROOT / "trainer"))
    from train_ppo import CriticModel
    critic = CriticModel(MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=1)).model)
    assert "value_head.weight" not in muon_parameter_names(critic)
    assert "model.layers.0.self_attn.o_proj.weight" in muon_parameter_names(critic)


def test_a_muon_step_orthogonalises_the_matrix_update_and_adamw_steps_the_rest():
    """The hidden matrix moves by lr * 0.2 * sqrt(max(A, B)) * O with O = NS5(gradient): O has the gradient's
    singular vectors and singular values near 1 (torch's quintic Newton-Schulz gives ~0.5-1.5, not exactly 1),
    even for a gradient whose singular values span 100x. The embedding moves by AdamW's first step, lr * sign(g)."""
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 16)
            self.layers = torch.nn.ModuleList([torch.nn.Linear(32, 16, bias=False)])

    torch.manual_seed(0)
    model, lr = Tiny(), 1e-2
    u, _ = torch.linalg.qr(torch.randn(16, 16))
    v, _ = torch.linalg.qr(torch.randn(32, 16))
    s = torch.logspace(1, -1, 16)  # singular values 10 ... 0.1
    model.layers[0].weight.grad = u @ torch.diag(s) @ v.T
    model.embed.weight.grad = g_emb = torch.randn(10, 16)
    w0, e0 = model.layers[0].weight.detach().clone(), model.embed.weight.detach().clone()
    build_optimizer(model, lr, 0.0, kind="muon").step()

    update = (w0 - model.layers[0].weight.detach()) / (lr * 0.2 * 32 ** 0.5)
    sv = torch.linalg.svdvals(update)
    assert sv.min() > 0.5 and sv.max() < 1.5 and sv.max() / sv.min() < 2  # the gradient's ratio is 100
    core = u.T @ update @ v  # diagonal when the update shares the gradient's singular vectors
    off = core - torch.diag(torch.diagonal(core))
    assert off.norm() < 0.05 * core.norm() and torch.diagonal(core).min() > 0.5
    assert torch.allclose(e0 - model.embed.weight.detach(), lr * torch.sign(g_emb), atol=1e-6)


def test_weight_decay_is_decoupled_like_adamw():
    """A zero gradient with weight decay wd: W <- W * (1 - lr * wd), as AdamW (the update O of a zero matrix is 0)."""
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8, bias=False)])

    model = Tiny()
    w0 = model.layers[0].weight.detach().clone()
    model.layers[0].weight.grad = torch.zeros(8, 8)
    build_optimizer(model, 0.1, 0.5, kind="muon").step()
    assert torch.allclose(model.layers[0].weight.detach(), w0 * (1 - 0.1 * 0.5), atol=1e-7)


@pytest.mark.slow
def test_muon_resumes_exactly_and_refuses_another_optimizer(tmp_path, capsys):
    """A real run stopped by Ctrl-C after step 2 and resumed ends with the uninterrupted run's fp32 weights and both
    halves' optimizer state, bit for bit (MoE + gate, so routed experts, router and gate all train)."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(open(DEMO / "pretrain.jsonl", encoding="utf-8").readlines()[:64]), encoding="utf-8")
    args = [*TINY, "--use_moe", "1", "--accumulation_steps", "1", "--data_path", data, "--batch_size", "4",
            "--log_interval", "1", "--save_interval", "1000", "--learning_rate", "2e-3", "--optimizer", "muon"]
    ref, part = tmp_path / "ref", tmp_path / "part"
    run_script(PRE, *args, *dirs(ref), tmp=ref)  # uninterrupted: 16 steps
    code, err = run_until_sigint(PRE, *args, *dirs(part), tmp=part, marker="step 2/16")
    assert code == 130, err
    stopped = int(err.split("stopped at step ")[1].split(";")[0])
    assert 2 <= stopped < 16
    proc = run_script(PRE, *args, *dirs(part), "--from_resume", "1", tmp=part)
    assert f"step {stopped + 1}/16" in proc.stdout
    a = torch.load(ref / "checkpoints" / "pretrain_64_moe_resume.pth", weights_only=True)
    b = torch.load(part / "checkpoints" / "pretrain_64_moe_resume.pth", weights_only=True)
    assert a["opt_step"] == b["opt_step"] == 16
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = a["optimizer"][""]["state"], b["optimizer"][""]["state"]
    assert set(sa) == set(sb) and set(sa["model.layers.0.self_attn.q_proj.weight"]) == {"momentum_buffer"}
    assert "exp_avg_sq" in sa["model.embed_tokens.weight"]  # the AdamW half's state is in the file too
    assert all(torch.equal(sa[n][k], sb[n][k]) for n in sa for k in sa[n])

    code, _, err = run_inprocess(PRE, *args[:-2], "--optimizer", "adamw", *dirs(part), "--from_resume", "1",
                                 capsys=capsys)
    assert code == 1 and err.strip().splitlines()[-1] == (
        f"error: resume file {part / 'checkpoints' / 'pretrain_64_moe_resume.pth'} was written with --optimizer "
        "muon, this run has --optimizer adamw; pass --optimizer muon to resume it, or --from_resume 0 to start over")


def test_fsdp_refuses_muon_with_one_line(tmp_path, capsys):
    code, _, err = run_inprocess(PRE, *TINY, *dirs(tmp_path), "--data_path", DEMO / "pretrain.jsonl",
                                 "--fsdp", "1", "--optimizer", "muon", capsys=capsys)
    assert code == 1 and "Traceback" not in err
    assert err.strip() == ("error: --optimizer muon does not run with --fsdp 1: Muon orthogonalises whole matrices "
                           "and FSDP gives each rank a shard of them; use DDP (--fsdp 0) or --optimizer adamw")
    assert not (tmp_path / "out").exists()


def test_lora_refuses_muon_with_one_line(tiny_random, tmp_path, capsys):
    shutil.copytree(tiny_random / "out", tmp_path / "out")
    code, _, err = run_inprocess("trainer/train_lora.py", *TINY, *dirs(tmp_path), "--from_dir", tmp_path / "out",
                                 "--from_weight", "pretrain", "--data_path", DEMO / "lora_identity.jsonl",
                                 "--optimizer", "muon", capsys=capsys)
    assert code == 1 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: --optimizer muon is for stages that train the whole model; this one freezes ")
    assert "LoRA trains adapters only); pass --optimizer adamw" in last
    assert not (tmp_path / "out" / "lora").exists()


@pytest.mark.slow
def test_muon_under_ddp_keeps_the_replicas_identical(tmp_path):
    log = run_torchrun(PRE, *TINY, "--use_moe", "1", *dirs(tmp_path), "--data_path", DEMO / "pretrain.jsonl",
                       "--batch_size", "2", "--accumulation_steps", "2", "--max_steps", "4", "--optimizer", "muon",
                       tmp=tmp_path)
    assert "weights identical on all 2 ranks" in log and "step 4/4" in log


def test_train_s_counts_training_time_and_leaves_evaluations_out(tmp_path, monkeypatch):
    """The metrics rows' train_s (what the optimizer experiment compares at equal wall-clock): seconds of training
    since the loop started, without the evaluation passes. A fake clock: each training batch takes 1 s, each
    evaluation 100 s."""
    import json
    import types
    import trainer.spine.loop as loop_module
    from test_trainer_utils import FixedTokens, collate, tiny_config
    from trainer.trainer_utils import TrainLoop, build_parser, init_run, parse_args

    clock = [1000.0]
    monkeypatch.setattr(loop_module, "time", types.SimpleNamespace(time=lambda: clock[0]))

    def evaluate(step, last):  # the stages' hook: a pass on every 2nd step and the last, else nothing
        if step % 2 and not last:
            return None
        clock[0] += 100.0
        return {"eval_loss": 1.0}

    args = parse_args(build_parser("test"), ["--device", "cpu", "--dtype", "float32", "--num_workers", "0",
                                             "--save_dir", str(tmp_path / "out"), "--checkpoint_dir",
                                             str(tmp_path / "ckp"), "--hidden_size", "64", "--log_interval", "1",
                                             "--batch_size", "2", "--accumulation_steps", "1"])
    ctx = init_run(args)
    config = tiny_config()
    model = MiniMindForCausalLM(config)
    loop = TrainLoop(args, ctx, model=model, optimizer=build_optimizer(model, 1e-3, kind="muon"),
                     dataset=FixedTokens(), collate_fn=collate, config=config, stage="test", evaluate=evaluate)
    for batch in loop:
        clock[0] += 1.0
        loop.backward(loop.model(batch["input_ids"], labels=batch["labels"]).loss)
    loop.finish()
    rows = [json.loads(x) for x in (tmp_path / "ckp" / "pretrain_64_metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["train_s"] for r in rows] == [1.0, 2.0, 3.0, 4.0, 5.0]  # 300 s of evaluation left out
    assert [("eval_loss" in r) for r in rows] == [False, True, False, True, True]
