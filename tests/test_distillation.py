"""Knowledge distillation: the loss against a hand computation, a teacher of another size (and MoE flag) than the
student, resume, the no-teacher fallback, flag-naming errors, and torchrun.

    python -m pytest tests/test_distillation.py -q
"""
import json
import math

import pytest
import torch

from conftest import DEMO, ROOT, dirs, read_metrics, run_script, run_torchrun
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer.train_distillation import distillation_loss
from trainer.trainer_utils import save_weights

# the student is the session's tiny SFT model (64 x 2, dense, gated); TINY's --hidden_size flags do not exist here
STUDENT = ["--student_hidden_size", "64", "--student_num_layers", "2", "--device", "cpu", "--num_workers", "0",
           "--max_seq_len", "128", "--data_path", DEMO / "sft.jsonl", "--batch_size", "4"]
TEACHER = ["--teacher_hidden_size", "96", "--teacher_num_layers", "3"]


def _save_teacher(folder, moe=False):
    """A random 96 x 3 teacher written where --from_teacher_weight full_sft looks for it."""
    torch.manual_seed(1)
    config = MiniMindConfig(hidden_size=96, num_hidden_layers=3, use_moe=moe, headwise_attn_output_gate=True)
    path = folder / "out" / f"full_sft_96{'_moe' if moe else ''}.pth"
    save_weights(MiniMindForCausalLM(config).state_dict(), str(path), config, stage="test teacher")


def _log_softmax(row):
    m = max(row)
    z = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - z for x in row]


def test_loss_equals_hand_computed_alpha_ce_plus_t2_kl():
    torch.manual_seed(0)
    B, T, Vs, Vt, alpha, temp = 2, 5, 6, 8, 0.3, 2.0  # the teacher has a larger vocabulary: only 6 are shared
    student, teacher = torch.randn(B, T, Vs), torch.randn(B, T, Vt) * 2
    labels = torch.tensor([[-100, -100, 3, 1, 5], [-100, 4, -100, 0, -100]])
    loss, ce, kd = distillation_loss(student, teacher, labels, alpha, temp)

    ces, kls = [], []
    for b in range(B):
        for t in range(T - 1):
            y = labels[b, t + 1].item()
            if y == -100:
                continue
            s, q = student[b, t].tolist(), teacher[b, t, :Vs].tolist()
            ces.append(-_log_softmax(s)[y])
            log_ps = _log_softmax([x / temp for x in s])
            log_pt = _log_softmax([x / temp for x in q])
            kls.append(sum(math.exp(lt) * (lt - ls) for lt, ls in zip(log_pt, log_ps)))
    want_ce, want_kl = sum(ces) / len(ces), sum(kls) / len(kls)
    assert len(ces) == 5
    assert ce.item() == pytest.approx(want_ce, rel=1e-5)
    assert kd.item() == pytest.approx(temp ** 2 * want_kl, rel=1e-5)
    assert loss.item() == pytest.approx(alpha * want_ce + (1 - alpha) * temp ** 2 * want_kl, rel=1e-5)

    # no teacher: plain CE; identical distributions: no KD term; no supervised token: 0, not NaN
    alone, ce2, kd2 = distillation_loss(student, None, labels, alpha, temp)
    assert alone.item() == pytest.approx(want_ce, rel=1e-5) and ce2.item() == alone.item() and kd2.item() == 0
    same = torch.cat([student, torch.randn(B, T, 2)], dim=-1)
    assert distillation_loss(student, same, labels, alpha, temp)[2].item() == pytest.approx(0, abs=1e-6)
    empty = distillation_loss(student, teacher, torch.full_like(labels, -100), alpha, temp)
    assert all(x.item() == 0 for x in empty)


def test_packed_batch_gives_the_padded_losses_with_the_same_positions_for_both_models():
    from dataset.lm_dataset import SFTDataset, collate_lm, collate_packed
    from trainer.trainer_utils import load_tokenizer, root_path
    items = [SFTDataset(DEMO / "sft.jsonl", load_tokenizer(root_path("model")), max_length=64, target_sample=0)[i]
             for i in range(8)]
    torch.manual_seed(0)
    student = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2))
    teacher = MiniMindForCausalLM(MiniMindConfig(hidden_size=96, num_hidden_layers=3, use_moe=True)).eval()
    losses = []
    for batch in (collate_lm(items), collate_packed(items, max_len=128)):
        fwd = dict(attention_mask=batch["attention_mask"], position_ids=batch.get("position_ids"))
        with torch.no_grad():
            t = teacher(batch["input_ids"], **fwd).logits
        losses.append(distillation_loss(student(batch["input_ids"], **fwd).logits, t, batch["labels"], 0.3, 2.0))
        assert batch["input_ids"].shape[0] < 8 or "position_ids" not in batch
    for packed, padded in zip(*reversed(losses)):  # loss, ce, kd
        torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)
    assert losses[0][2].item() > 0.01  # the teacher differs from the student: the KD term is really compared


def test_bigger_teacher_trains_the_student_and_resumes(sft_copy):
    _save_teacher(sft_copy)
    common = [*STUDENT, *TEACHER, *dirs(sft_copy), "--log_interval", "2", "--learning_rate", "1e-4"]
    proc = run_script("trainer/train_distillation.py", *common, "--max_steps", "4", tmp=sft_copy)
    assert "Teacher Params" in proc.stdout and "full_sft_96.pth" in proc.stdout
    proc = run_script("trainer/train_distillation.py", *common, "--max_steps", "6", "--from_resume", "1",
                      tmp=sft_copy)
    assert "resumed from" in proc.stdout
    rows = read_metrics(sft_copy, "full_dist")
    assert [r["global_step"] for r in rows] == [2, 4, 6]
    for r in rows:  # a random teacher disagrees with the student: a real KD term
        assert r["distill_loss"] > 0.01 and r["ce_loss"] > 0
        assert r["loss"] == pytest.approx(0.5 * r["ce_loss"] + 0.5 * r["distill_loss"] + r["aux_loss"], rel=1e-5)
    side = json.loads((sft_copy / "out" / "full_dist_64.json").read_text())
    assert side["model_config"]["hidden_size"] == 64 and side["model_config"]["num_hidden_layers"] == 2
    assert side["global_step"] == 6


def test_no_teacher_on_purpose_and_errors_name_the_right_flags(sft_copy):
    # (a missing teacher file is an error: tests/test_bad_input.py, distill_teacher_missing)
    # MoE student from scratch (its aux loss is added unscaled), no teacher on purpose
    proc = run_script("trainer/train_distillation.py", *STUDENT, *dirs(sft_copy), "--from_student_weight", "none",
                      "--student_use_moe", "1", "--from_teacher_weight", "none", "--max_steps", "2",
                      "--log_interval", "1", tmp=sft_copy)
    assert "NOTICE: no teacher (--from_teacher_weight none)" in proc.stdout
    for r in read_metrics(sft_copy, "full_dist", moe=True):
        assert r["distill_loss"] == 0 and r["aux_loss"] > 0
        assert r["loss"] == pytest.approx(r["ce_loss"] + r["aux_loss"], rel=1e-5)
    # a teacher file of another depth: the message names the teacher's flag, not --num_hidden_layers
    _save_teacher(sft_copy)
    bad = run_script("trainer/train_distillation.py", *STUDENT, *dirs(sft_copy), "--teacher_hidden_size", "96",
                     "--teacher_num_layers", "2", tmp=sft_copy, check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "teacher:" in bad.stderr and "--teacher_num_layers 3" in bad.stderr


def test_torchrun_two_ranks_with_a_moe_teacher(sft_copy):
    # --use_moe 1 reaches the teacher by default; the student overrides it
    _save_teacher(sft_copy, moe=True)
    out = run_torchrun("trainer/train_distillation.py", *STUDENT, *TEACHER, *dirs(sft_copy), "--use_moe", "1",
                       "--student_use_moe", "0", "--max_steps", "3", "--log_interval", "1", tmp=sft_copy,
                       cwd=ROOT / "trainer")
    assert "weights identical on all 2 ranks" in out and "full_sft_96_moe.pth" in out
    assert (sft_copy / "out" / "full_dist_64.pth").exists()
    assert all(r["distill_loss"] > 0 for r in read_metrics(sft_copy, "full_dist"))
