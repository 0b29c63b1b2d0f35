"""scripts/inspect_model.py end to end: two tiny checkpoints the test saves (MoE + gate, dense without gate) side by
side, with hand-known gate and sink values, the table, the JSON and the PNG; and its bad-input lines.

    python -m pytest tests/test_inspect_model.py -q
"""
import json

import pytest
import torch

from conftest import run_inprocess, run_script
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from test_model_stats import gate_rows, query_rows
from test_plot_metrics import png_size
from trainer.trainer_utils import load_tokenizer, root_path, save_weights

TEXTS = ["春天来了，河边的柳树发出了新芽。", "The river starts in the mountains, where snow melts in spring.",
         "3 加 4 等于 7。"]


def save_tiny(path, gate, moe):
    """A tiny random model whose queries are zero (uniform attention: sink share 1/(t+1) at position t) and, when
    gated, whose gate rows are zero (every score sigmoid(0) = 0.5)."""
    config = MiniMindConfig(hidden_size=64, num_hidden_layers=2, use_moe=moe, headwise_attn_output_gate=gate)
    torch.manual_seed(0)
    model = MiniMindForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.weight[query_rows(attn)] = 0
            if gate:
                attn.q_proj.weight[gate_rows(attn)] = 0
    save_weights(model.state_dict(), str(path), config, tokenizer=load_tokenizer(root_path("model")),
                 stage="Pretrain", step=1, tokenizer_path=root_path("model"))


@pytest.mark.slow
def test_two_checkpoints_side_by_side(tmp_path):
    save_tiny(tmp_path / "on" / "pretrain_64_moe.pth", gate=True, moe=True)
    save_tiny(tmp_path / "off" / "pretrain_64.pth", gate=False, moe=False)
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS))
    proc = run_script("scripts/inspect_model.py", "--weight", tmp_path / "on" / "pretrain_64_moe.pth",
                      tmp_path / "off" / "pretrain_64.pth", "--labels", "gate on", "gate off", "--data_path", data,
                      "--max_samples", "2", "--batch_size", "2", "--device", "cpu", "--dtype", "float32",
                      "--json", tmp_path / "r.json", "--out", tmp_path / "r.png", tmp=tmp_path)

    # the first two texts as the pretrain stage tokenizes them, in one right-padded batch
    tok = load_tokenizer(root_path("model"))
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) + 2 for t in TEXTS[:2]]
    assert lengths[0] != lengths[1]
    shares = [1 / (t + 1) for n in lengths for t in range(1, n)]
    sink = sum(shares) / len(shares)

    res = json.loads((tmp_path / "r.json").read_text())
    on, off = res["models"]
    assert [on["label"], off["label"]] == ["gate on", "gate off"]
    assert on["texts"] == 2 and on["tokens"] == sum(lengths) and res["data"] == str(data)
    s = on["summary"]
    assert s["gate_mean"] == pytest.approx(0.5) and s["gate_sparsity"] == 0.0
    for i in range(2):
        assert s[f"layers/sink_share_L{i}"] == pytest.approx(sink, rel=1e-5)
        assert off["summary"][f"layers/sink_share_L{i}"] == pytest.approx(sink, rel=1e-5)
        assert sum(s[f"layers/expert_load_L{i}_E{e}"] for e in range(4)) == pytest.approx(1.0)
        assert sum(on["layers"][i]["expert_load"]) == pytest.approx(1.0)
    assert s["act_max"] > 0 and {"expert_load_cv", "expert_entropy"} <= set(s)
    assert not any("gate" in k or "expert" in k for k in off["summary"])  # dense, no gate: no such keys

    # printed table: a header naming the columns, one row per layer, per model
    assert "== gate on" in proc.stdout and "== gate off" in proc.stdout
    assert "gate<0.1" in proc.stdout and " E3" in proc.stdout
    # 5 bar panels (gate mean, gate sparsity, sink, act, expert CV) of 3.8 x 3.3 in, a heatmap row for the MoE model
    assert png_size(tmp_path / "r.png") == (1900, 660)


def test_bad_input_is_one_line(tmp_path, capsys):
    save_tiny(tmp_path / "pretrain_64.pth", gate=True, moe=False)
    code, _, err = run_inprocess("scripts/inspect_model.py", "--weight", tmp_path / "pretrain_64.pth", "--labels",
                                 "a", "b", capsys=capsys)
    assert code == 1 and "--labels gives 2 names for 1 weights" in err and "Traceback" not in err
    code, _, err = run_inprocess("scripts/inspect_model.py", "--weight", tmp_path / "model.pth", capsys=capsys)
    assert code == 1 and "expected a file named {weight}_{hidden}[_moe].pth" in err
    code, _, err = run_inprocess("scripts/inspect_model.py", "--hf_dir", tmp_path, "--weight", "pretrain",
                                 capsys=capsys)
    assert code == 1 and "--hf_dir and --weight both name a model" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    code, _, err = run_inprocess("scripts/inspect_model.py", "--weight", tmp_path / "pretrain_64.pth", "--data_path",
                                 bad, "--device", "cpu", capsys=capsys)
    assert code == 1 and "neither \"text\" (pretrain) nor \"conversations\" (SFT)" in err
    assert not list(tmp_path.glob("*.png"))

