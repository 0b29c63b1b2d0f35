"""scripts/plot_metrics.py: PNGs from real training runs' metrics JSONL (one run, two overlaid, one per run),
resumed runs, smoothing and bad input.

    python -m pytest tests/test_plot_metrics.py -q
"""
import importlib.util
import json
import struct
import subprocess
import sys

import pytest

from conftest import ROOT, script_env

spec = importlib.util.spec_from_file_location("plot_metrics", ROOT / "scripts" / "plot_metrics.py")
pm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pm)


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    assert data[-8:-4] == b"IEND", f"{path} is truncated"
    return struct.unpack(">II", data[16:24])


def numeric_keys(path) -> set[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def test_real_runs_one_and_overlaid(tiny_sft, tmp_path):
    pre = tiny_sft / "checkpoints" / "pretrain_64_metrics.jsonl"
    sft = tiny_sft / "checkpoints" / "full_sft_64_metrics.jsonl"
    [one] = pm.main([str(pre), "--out", str(tmp_path / "pre.png")])
    # every numeric series of the file except the counters and the ETA, loss first
    assert set(one["keys"]) == numeric_keys(pre) - {"epoch", "step", "global_step", "micro_step", "samples", "eta_min"}
    assert one["keys"][0] == "loss" and {"lr", "grad_norm", "tokens_per_s"} <= set(one["keys"])
    w, h = png_size(tmp_path / "pre.png")
    assert (w, h) == (1380, 310 * -(-len(one["keys"]) // 3))  # 3 columns of 4.6 x 3.1 inches at 100 dpi
    assert 20_000 < (tmp_path / "pre.png").stat().st_size < 400_000

    [both] = pm.main([str(pre), str(sft), "--out", str(tmp_path / "both.png"), "--smooth", "0.5", "--logy", "lr"])
    assert both["runs"] == ["pretrain_64", "full_sft_64"] and "loss" in both["keys"]
    assert png_size(tmp_path / "both.png")[0] == 1380

    written = pm.main([str(pre), str(sft), "--out", str(tmp_path / "runs" / "r.png"), "--per_run", "--keys",
                       "loss,lr"])
    assert [w["path"] for w in written] == [str(tmp_path / "runs" / "r_pretrain_64.png"),
                                            str(tmp_path / "runs" / "r_full_sft_64.png")]
    assert all(png_size(tmp_path / "runs" / f"r_{n}.png") == (920, 310) for n in ("pretrain_64", "full_sft_64"))


def test_resumed_run_keeps_the_continuation(tmp_path):
    rows = [{"global_step": s, "loss": loss, "reward": r, "note": "x", "done": False}
            for s, loss, r in [(10, 5.0, 0.1), (20, 4.0, 0.2), (30, 3.5, 0.3), (40, 3.4, 0.35)]]
    # crashed after step 40, resumed from the checkpoint at step 20: logs 30 and 50 again (40 never re-logged)
    rows += [{"global_step": 30, "loss": 3.0, "reward": 0.5, "kl": float("nan")},
             {"global_step": 50, "loss": 2.5, "reward": 0.6, "kl": 0.01}]
    path = tmp_path / "grpo_64_metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"global_step": 60, "lo')  # partial last line
    axis, got = pm.read_run(path, "global_step")
    assert axis == "global_step" and list(got) == [10, 20, 30, 50]
    assert [r["loss"] for r in got.values()] == [5.0, 4.0, 3.0, 2.5]
    [res] = pm.main([str(path), "--out", str(tmp_path / "g.png")])
    assert res["keys"] == ["loss", "reward", "kl"] and res["runs"] == ["grpo_64"]  # strings and booleans skipped
    png_size(tmp_path / "g.png")


def test_smoothing_is_debiased():
    assert pm.ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert pm.ema([0.0, 10.0], 0.5) == pytest.approx([0.0, 2.5 / 0.375])
    out = pm.ema([1.0, float("nan"), 3.0], 0.5)
    assert out[0] == 1.0 and out[1] == 1.0 and out[2] == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)


def test_bad_input_names_the_file_and_line(tmp_path):
    bad = tmp_path / "a_metrics.jsonl"
    bad.write_text('{"global_step": 1, "loss": 1.0}\nnot json\n{"global_step": 2, "loss": 0.5}\n')
    with pytest.raises(SystemExit, match=r"a_metrics.jsonl line 2: not a JSON object"):
        pm.main([str(bad)])
    good = tmp_path / "b_metrics.jsonl"
    good.write_text('{"global_step": 1, "loss": 1.0}\n')
    with pytest.raises(SystemExit, match="--keys reward not found"):
        pm.main([str(good), "--keys", "reward", "--out", str(tmp_path / "x.png")])
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_metrics.py"), str(tmp_path / "none.jsonl")],
                          capture_output=True, text=True, env=script_env(tmp_path), timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_labelled_runs_overlaid_against_tokens(tmp_path):
    """Two runs (gate on / off) labelled FILE:LABEL, eval metrics only at evaluation steps, drawn against tokens; the
    per-layer keys (with "/") and the counters stay out unless named."""
    def write(path, bpb):
        rows = []
        for step in range(1, 7):
            row = {"global_step": step, "micro_step": 2 * step, "samples": 8 * step, "tokens": 1000 * step,
                   "loss": 5.0 - step * 0.1}
            if step % 3 == 0:  # evaluated every 3 steps
                row.update(eval_bpb=bpb - step * 0.01, sink_share=0.5, **{"layers/sink_share_L0": 0.4})
            rows.append(row)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    on, off = tmp_path / "on" / "pretrain_64_moe_metrics.jsonl", tmp_path / "off" / "pretrain_64_moe_metrics.jsonl"
    write(on, 2.0)
    write(off, 2.5)
    [res] = pm.main([f"{on}:gate on", f"{off}:gate off", "--x", "tokens", "--out", str(tmp_path / "o.png")])
    assert res["runs"] == ["gate on", "gate off"]
    assert res["keys"] == ["loss", "eval_bpb", "sink_share"]
    assert res["series"]["eval_bpb"]["gate on"] == ([3000.0, 6000.0], [1.97, 1.94])
    assert res["series"]["eval_bpb"]["gate off"] == ([3000.0, 6000.0], [2.47, 2.44])
    assert res["series"]["loss"]["gate off"][0] == [1000.0 * s for s in range(1, 7)]
    assert png_size(tmp_path / "o.png")[0] == 1380

    # named per-layer key; unlabelled files of the same name are told apart by their folder
    [res] = pm.main([str(on), str(off), "--keys", "layers/sink_share_L0", "--out", str(tmp_path / "l.png")])
    assert res["runs"] == ["pretrain_64_moe", "off/pretrain_64_moe"]
    assert res["series"]["layers/sink_share_L0"]["off/pretrain_64_moe"] == ([3.0, 6.0], [0.4, 0.4])
    with pytest.raises(SystemExit, match="two runs are labelled 'x'"):
        pm.main([f"{on}:x", f"{off}:x", "--out", str(tmp_path / "d.png")])
    with pytest.raises(SystemExit, match="none.jsonl not found"):
        pm.main([f"{tmp_path / 'none.jsonl'}:gate on", "--out", str(tmp_path / "d.png")])
