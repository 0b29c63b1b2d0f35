"""LoRA: adapters on every attention projection (the gated, non-square q_proj too), frozen base, strict loading,
merging; train_lora.py end to end (2-rank torchrun, resume on 1 rank, chat with eval_llm.py --lora_weight).

    python -m pytest tests/test_lora.py -q
"""
import hashlib
import json
import re
import shutil

import pytest
import torch

from conftest import DEMO, ROOT, TINY, read_metrics, run_eval_cli, run_script, run_torchrun
from model.model_lora import (LoRALinear, apply_lora, apply_lora_from_file, base_fingerprint, load_lora,
                              lora_state_dict, merge_lora)
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer.trainer_utils import UserError, build_optimizer, load_weights, save_weights


def tiny_model(**kw):
    torch.manual_seed(0)
    cfg = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         headwise_attn_output_gate=True, **kw)
    return MiniMindForCausalLM(cfg)


def randomize_lora(model, std=0.05):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


IDS = torch.randint(3, 6400, (2, 12), generator=torch.Generator().manual_seed(2))


def test_adapters_cover_the_gated_q_proj_and_only_they_train():
    model = tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(IDS).logits
    apply_lora(model, rank=8)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and q.out_features == 64 + 4  # queries + one gate score per head
    assert q.lora.B.weight.shape == (68, 8) and q.lora.A.weight.shape == (8, 64) and q.lora.scale == 1.0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model)) and len(trainable) == 2 * 4 * 2  # A,B x q,k,v,o x 2 layers
    assert torch.equal(model(IDS).logits, before)  # B = 0: training starts from the base model

    # weight decay must not touch the frozen base either
    opt = build_optimizer(model, 1e-2, weight_decay=0.5)
    for _ in range(3):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())
    assert not torch.equal(model(IDS).logits, before)


def test_merge_gives_the_same_logits_and_a_plain_state_dict(tmp_path):
    model = tiny_model(use_moe=True).eval()
    layout = {k: v.shape for k, v in model.state_dict().items()}
    apply_lora(model, rank=4, alpha=16, targets="q_proj,o_proj,gate_proj")  # scale 4; experts' MLP too
    randomize_lora(model)
    with torch.no_grad():
        adapted = model(IDS).logits
        merged = merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        assert {k: v.shape for k, v in merged.state_dict().items()} == layout
        torch.testing.assert_close(merged(IDS).logits, adapted, atol=1e-5, rtol=1e-5)
    path = str(tmp_path / "merged_64_moe.pth")
    save_weights(merged.state_dict(), path, merged.config)
    load_weights(tiny_model(use_moe=True), path, merged.config)  # strict: loads as a normal MiniMind weight


def test_load_lora_is_strict_and_a_sidecarless_file_is_read_off_its_tensors(tmp_path):
    model = apply_lora(tiny_model(), rank=4)
    randomize_lora(model)
    path = str(tmp_path / "lora_identity_64.pth")
    torch.save(lora_state_dict(model), path)  # MiniMind-style: tensors only, no sidecar

    other_rank = apply_lora(tiny_model(), rank=8)
    with pytest.raises(UserError, match="shape mismatches"):
        load_lora(other_rank, path)
    fewer_targets = apply_lora(tiny_model(), rank=4, targets="q_proj")
    with pytest.raises(UserError, match="unexpected"):
        load_lora(fewer_targets, path)
    with pytest.raises(UserError, match="no LoRA adapters"):
        load_lora(tiny_model(), path)
    with pytest.raises(UserError, match="not found"):
        apply_lora_from_file(tiny_model(), str(tmp_path / "nope_64.pth"))

    loaded = apply_lora_from_file(tiny_model(), path)  # rank 4 and q,k,v,o inferred; alpha = rank
    assert loaded.model.layers[1].self_attn.v_proj.lora.rank == 4
    assert all(torch.equal(lora_state_dict(loaded)[k], v) for k, v in lora_state_dict(model).items())
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits)


def test_bad_targets_are_refused():
    with pytest.raises(UserError, match="tied to the input embedding"):
        apply_lora(tiny_model(), targets="lm_head")
    with pytest.raises(UserError, match="matches no nn.Linear.*q_proj"):
        apply_lora(tiny_model(), targets="q_proj,qproj")


def _bad_lora_files(tmp_path, good: dict) -> dict:
    """name -> (path of a broken LoRA file, what its one-line error must say)."""
    raw = tmp_path / "good.pth"
    torch.save(good, raw)
    key = next(k for k in good if k.endswith(".lora.B.weight"))
    cases = {
        "empty": (b"", r"is empty \(0 bytes\)"),
        "truncated": (raw.read_bytes()[:raw.stat().st_size // 2], "is not a readable PyTorch file"),
        "list": ([good[key]], r"not a dict of tensors \(a list\)"),
        "dict_of_ints": ({key: 3}, r"not a dict of tensors \(a dict\)"),
        "full_weights": (tiny_model().state_dict(), "holds no LoRA tensors"),
        "shape": ({**good, key: torch.zeros(3, 3)}, "shape mismatches"),
        "missing_key": ({k: v for k, v in good.items() if k != key}, "missing"),
        "nan": ({**good, key: torch.full_like(good[key], float("nan"))}, r"holds NaN/inf in 1 tensor\(s\)"),
        "inf": ({**good, key: torch.full_like(good[key], float("inf"))}, "holds NaN/inf"),
        "int64": ({k: v.long() for k, v in good.items()}, r"non-float tensors, e.g. .*\(int64\)"),
    }
    out = {}
    for name, (content, message) in cases.items():
        path = tmp_path / "lora" / f"{name}_64.pth"
        path.parent.mkdir(exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        out[name] = (path, message)
    return out


def test_broken_lora_files_are_one_line_each(tmp_path):
    model = apply_lora(tiny_model(), rank=4)
    randomize_lora(model)
    for name, (path, message) in _bad_lora_files(tmp_path, lora_state_dict(model)).items():
        with pytest.raises(UserError, match=message) as e:
            apply_lora_from_file(tiny_model(), str(path))
        assert str(path) in str(e.value) and "\n" not in str(e.value), name
    # a sidecar with unreadable settings is one line too
    good = tmp_path / "lora" / "sidecar_64.pth"
    torch.save(lora_state_dict(model), good)
    good.with_suffix(".json").write_text(json.dumps({"args": {"lora_rank": "eight", "lora_target": "q_proj"}}))
    with pytest.raises(UserError, match="unreadable LoRA settings"):
        apply_lora_from_file(tiny_model(), str(good))


def test_eval_llm_with_a_broken_lora_prints_one_line(tiny_random, tmp_path, monkeypatch, capsys):
    # eval_llm, the server and convert_model.py all load --lora_weight through chat_utils.load_model
    out = tmp_path / "out"
    shutil.copytree(tiny_random / "out", out)
    model = apply_lora(tiny_model(), rank=4)
    for name, (path, message) in _bad_lora_files(out, lora_state_dict(model)).items():
        if name not in ("truncated", "nan", "int64"):
            continue
        code, stdout, stderr = run_eval_cli(["--save_dir", str(out), "--weight", "pretrain", "--lora_weight", name,
                                             "--device", "cpu", "--prompts", "hi", "--max_new_tokens", "2"],
                                            monkeypatch, capsys)
        assert code == 1 and "Traceback" not in stderr and "🤖" not in stdout, (name, stderr)
        assert [line for line in stderr.splitlines() if line.strip()] == [stderr.strip()]
        assert re.search(message, stderr) and str(path) in stderr


def test_base_fingerprint_follows_the_weights_not_the_load_path(tmp_path, capsys):
    base = tiny_model()
    path = str(tmp_path / "full_sft_64.pth")
    save_weights(base.state_dict(), path, base.config)  # fp16 on disk
    loaded = tiny_model()
    with torch.no_grad():
        for p in loaded.parameters():
            p.zero_()
    load_weights(loaded, path, base.config)
    fp = base_fingerprint(loaded)
    assert fp == base_fingerprint(base.half().float()) and len(fp) == 16  # fp16 file -> fp32 model: the same
    assert base_fingerprint(apply_lora(loaded, rank=4)) == fp  # the adapters are not part of the base
    other = tiny_model()
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.add_(1e-2)  # what any further training does to a tensor
    assert base_fingerprint(other) != fp

    # a LoRA whose sidecar records that fingerprint: silent on its base, a warning on another one
    lora = apply_lora(tiny_model(), rank=4)
    randomize_lora(lora)
    lora_path = tmp_path / "lora_identity_64.pth"
    torch.save(lora_state_dict(lora), lora_path)
    lora_path.with_suffix(".json").write_text(json.dumps({"args": {
        "lora_rank": 4, "lora_target": "q_proj,k_proj,v_proj,o_proj", "from_weight": "full_sft",
        "from_dir": "out", "lora_base_fingerprint": fp}}))
    capsys.readouterr()
    target = tiny_model()
    load_weights(target, path, base.config)
    apply_lora_from_file(target, str(lora_path))
    assert "WARNING" not in capsys.readouterr().err
    apply_lora_from_file(other, str(lora_path))
    err = capsys.readouterr().err
    assert f"WARNING: LoRA file {lora_path} was trained on other base weights (full_sft in out, fingerprint {fp})" \
        in err and base_fingerprint(other) in err


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_train_lora_on_two_ranks_resume_on_one_then_chat(sft_copy):
    tmp = sft_copy
    out, lora_dir = tmp / "out", tmp / "out" / "lora"
    base_hash = _sha(out / "full_sft_64.pth")
    common = [*TINY, "--save_dir", lora_dir, "--from_dir", out, "--checkpoint_dir", tmp / "checkpoints",
              "--batch_size", "4", "--log_interval", "2", "--learning_rate", "5e-3"]
    # the user's command: from trainer/, torchrun, relative data path
    log = run_torchrun("trainer/train_lora.py", *common, "--data_path", "../dataset/demo/lora_identity.jsonl",
                       "--max_steps", "4", tmp=tmp, cwd=ROOT / "trainer")
    assert "weights identical on all 2 ranks" in log and "LoRA 参数量" in log
    proc = run_script("trainer/train_lora.py", *common, "--data_path", DEMO / "lora_identity.jsonl",
                      "--max_steps", "6", "--from_resume", "1", tmp=tmp)
    assert "resumed from" in proc.stdout and "saved with world size 2, now 1" in proc.stdout
    assert [r["global_step"] for r in read_metrics(tmp, "lora_identity")] == [2, 4, 6]

    # the weights file: LoRA tensors only (gated q_proj included) + a sidecar that says how to rebuild them
    path = lora_dir / "lora_identity_64.pth"
    sd = torch.load(path, weights_only=True)
    assert sd and all(".lora." in k for k in sd)
    assert sd["model.layers.0.self_attn.q_proj.lora.B.weight"].shape == (64 + 8, 8)
    assert any(v.abs().sum() > 0 for k, v in sd.items() if k.endswith("B.weight"))  # it trained
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["args"]["lora_rank"] == 8 and side["args"]["lora_alpha"] == 8.0
    assert side["args"]["lora_target"] == "q_proj,k_proj,v_proj,o_proj" and side["args"]["from_weight"] == "full_sft"
    assert side["model_config"]["headwise_attn_output_gate"] is True and side["global_step"] == 6
    resume = torch.load(tmp / "checkpoints" / "lora_identity_64_resume.pth", weights_only=True)
    assert set(resume["model"]) == set(sd)  # fp32 adapters only, not the frozen base

    # the base is bit-identical: the full_sft file untouched, and base + adapters holds exactly its tensors
    assert _sha(out / "full_sft_64.pth") == base_hash
    cfg = MiniMindConfig(hidden_size=64, num_hidden_layers=2, headwise_attn_output_gate=True)
    plain, adapted = MiniMindForCausalLM(cfg), MiniMindForCausalLM(cfg)
    load_weights(plain, str(out / "full_sft_64.pth"), cfg)
    load_weights(adapted, str(out / "full_sft_64.pth"), cfg)
    apply_lora_from_file(adapted, str(path))
    adapted_sd = adapted.state_dict()
    assert side["args"]["lora_base_fingerprint"] == base_fingerprint(plain)  # checked when the adapters are applied
    assert all(torch.equal(adapted_sd[k], v) for k, v in plain.state_dict().items())
    assert set(adapted_sd) - set(plain.state_dict()) == set(sd)
    ungated = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2))
    with pytest.raises(UserError, match="--headwise_attn_output_gate 1"):
        apply_lora_from_file(ungated, str(path))

    chat = run_script("eval_llm.py", "--save_dir", out, "--weight", "full_sft", "--lora_weight", "lora_identity",
                      "--mode", "auto", "--max_new_tokens", "8", "--seed", "0", "--device", "cpu",
                      "--prompts", "你是谁？", tmp=tmp)
    assert "+ LoRA lora_identity" in chat.stdout and chat.stdout.count("🤖") == 1 and "tokens," in chat.stdout
