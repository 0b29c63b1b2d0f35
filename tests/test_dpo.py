"""DPO: the loss and its metrics against a hand computation (both loss types), memory-lean log-probs equal
log_softmax, empty answers add nothing, one step raises the margin; train_dpo.py on 2 ranks, resumed on 1.

    python -m pytest tests/test_dpo.py -q
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import DEMO, TINY, read_metrics, run_script, run_torchrun
from dataset.lm_dataset import DPODataset, collate_dpo, collate_dpo_packed
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer.train_dpo import dpo_loss, sequence_logps, token_logps
from trainer.trainer_utils import load_tokenizer, root_path


def hand_dpo(pol, ref, beta):
    """Plain-python DPO over pairs [(chosen, rejected)] of per-sequence log-probs."""
    rows = []
    for (pc, pr), (rc, rr) in zip(pol, ref):
        rw_c, rw_r = beta * (pc - rc), beta * (pr - rr)
        m = rw_c - rw_r
        rows.append(dict(loss=math.log1p(math.exp(-m)), acc=float(m > 0), margin=m, rc=rw_c, rr=rw_r, pc=pc, pr=pr))
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def test_dpo_loss_and_metrics_equal_a_hand_computation():
    pol = [(-1.2, -2.0), (-3.0, -2.5), (-0.7, -0.9)]
    ref = [(-1.5, -1.8), (-2.0, -2.6), (-0.8, -0.8)]
    as_rows = lambda pairs: torch.tensor([c for c, _ in pairs] + [r for _, r in pairs], dtype=torch.float64)
    loss, m = dpo_loss(as_rows(pol), as_rows(ref), beta=0.5)
    want = hand_dpo(pol, ref, 0.5)
    assert loss.item() == pytest.approx(want["loss"], abs=1e-12)
    assert m["reward_accuracy"].item() == pytest.approx(want["acc"]) == 2 / 3
    for key, hand in [("reward_margin", "margin"), ("chosen_reward", "rc"), ("rejected_reward", "rr"),
                      ("chosen_logp", "pc"), ("rejected_logp", "pr")]:
        assert m[key].item() == pytest.approx(want[hand], abs=1e-12), key
    assert m["empty_pairs"].item() == 0


@pytest.mark.parametrize("loss_type", ["sigmoid", "sigmoid_norm"])
def test_sequence_logps_sum_or_mean_of_the_answer_tokens(loss_type):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 11, generator=g, dtype=torch.float64)  # 2 pairs, T=6, vocab 11
    labels = torch.full((4, 6), -100)
    labels[0, 3:] = torch.tensor([4, 5, 6])  # chosen 0: 3 answer tokens
    labels[1, 2:5] = torch.tensor([1, 2, 3])  # chosen 1: 3
    labels[2, 4:] = torch.tensor([7, 8])  # rejected 0: 2
    labels[3, 1:] = torch.tensor([9, 10, 0, 1, 2])  # rejected 1: 5
    normalize = loss_type == "sigmoid_norm"
    rows = torch.arange(4)[:, None].expand(4, 6)  # collate_dpo: one sequence per row
    got, n_tokens = sequence_logps(logits, labels, rows, 4, normalize)
    logp = F.log_softmax(logits, dim=-1)
    for i in range(4):
        # label at position t is predicted by the logits at t-1
        terms = [logp[i, t - 1, labels[i, t]].item() for t in range(1, 6) if labels[i, t] != -100]
        want = sum(terms) / len(terms) if normalize else sum(terms)
        assert got[i].item() == pytest.approx(want, abs=1e-10) and n_tokens[i] == len(terms)
    ref = got + torch.tensor([0.3, -0.1, 0.2, 0.4], dtype=torch.float64)
    loss, _ = dpo_loss(got, ref, beta=0.1, n_tokens=n_tokens)
    want = hand_dpo([(got[0].item(), got[2].item()), (got[1].item(), got[3].item())],
                    [(ref[0].item(), ref[2].item()), (ref[1].item(), ref[3].item())], 0.1)
    assert loss.item() == pytest.approx(want["loss"], abs=1e-12)


def test_token_logps_equal_log_softmax_with_gradients():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 9, 50, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9), generator=g)
    labels[0, :4] = -100
    got, mask = token_logps(logits, labels)
    assert got.shape == (2, 9) and not mask[:, -1].any()  # the last position predicts nothing
    full = F.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    want = full * (labels[:, 1:] != -100)
    torch.testing.assert_close(got[:, :-1], want)
    weights = torch.arange(8.0)
    (gl,) = torch.autograd.grad((got[:, :-1] * weights).sum(), logits)
    (wl,) = torch.autograd.grad((want * weights).sum(), logits)
    torch.testing.assert_close(gl, wl)


def test_a_pair_without_answer_tokens_adds_nothing_and_is_counted():
    pol = torch.tensor([-1.0, 0.0, -2.0, 0.0], requires_grad=True)  # pair 1: empty chosen (n=0, logp 0)
    ref = torch.tensor([-1.1, 0.0, -1.9, 0.0])
    n_tokens = torch.tensor([3, 0, 4, 5])
    loss, m = dpo_loss(pol, ref, beta=0.1, n_tokens=n_tokens)
    assert loss.item() == pytest.approx(hand_dpo([(-1.0, -2.0)], [(-1.1, -1.9)], 0.1)["loss"])
    assert m["empty_pairs"].item() == 1 and m["reward_accuracy"].item() == 1.0
    loss.backward()
    assert torch.isfinite(pol.grad).all() and pol.grad[1] == 0 and pol.grad[3] == 0
    none, m = dpo_loss(pol, ref, beta=0.1, n_tokens=torch.zeros(4, dtype=torch.long))
    assert none.item() == 0 and m["empty_pairs"].item() == 2 and not torch.isnan(m["reward_margin"])


@pytest.mark.parametrize("loss_type", ["sigmoid_norm", "sigmoid"])
def test_one_optimizer_step_raises_the_margin_on_its_batch(loss_type):
    torch.manual_seed(0)
    tok = load_tokenizer(root_path("model"))
    ds = DPODataset(DEMO / "dpo.jsonl", tok, max_length=64)
    batch = collate_dpo([ds[i] for i in range(4)])
    cfg = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         headwise_attn_output_gate=True)
    policy = MiniMindForCausalLM(cfg)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    normalize = loss_type == "sigmoid_norm"

    seqs = (batch["sample_index"], 8, normalize)

    def margin():
        with torch.no_grad():
            pol, n = sequence_logps(policy(batch["input_ids"]).logits, batch["labels"], *seqs)
            r, _ = sequence_logps(ref(batch["input_ids"]).logits, batch["labels"], *seqs)
            return dpo_loss(pol, r, 0.1, n)

    loss0, m0 = margin()
    assert loss0.item() == pytest.approx(math.log(2)) and m0["reward_margin"].item() == 0  # policy == ref
    pol, n = sequence_logps(policy(batch["input_ids"]).logits, batch["labels"], *seqs)
    with torch.no_grad():
        r, _ = sequence_logps(ref(batch["input_ids"]).logits, batch["labels"], *seqs)
    dpo_loss(pol, r, 0.1, n)[0].backward()
    opt.step()
    loss1, m1 = margin()
    assert m1["reward_margin"].item() > 0 and loss1.item() < loss0.item()
    assert m1["reward_accuracy"].item() > 0.5


@pytest.mark.parametrize("loss_type", ["sigmoid_norm", "sigmoid"])
def test_packed_batch_gives_the_padded_batch_loss_metrics_and_gradient(loss_type):
    tok = load_tokenizer(root_path("model"))
    items = [DPODataset(DEMO / "dpo.jsonl", tok, max_length=64, target_sample=0)[i] for i in range(6)]
    cfg = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         headwise_attn_output_gate=True)
    torch.manual_seed(0)
    policy, ref = MiniMindForCausalLM(cfg), MiniMindForCausalLM(cfg).eval()  # different weights: rewards != 0
    normalize = loss_type == "sigmoid_norm"
    results = []
    for batch in (collate_dpo(items), collate_dpo_packed(items, max_len=128)):
        fwd = dict(attention_mask=batch["attention_mask"], position_ids=batch.get("position_ids"))
        seqs = (batch["sample_index"], 12, normalize)
        pol, n = sequence_logps(policy(batch["input_ids"], **fwd).logits, batch["labels"], *seqs)
        with torch.no_grad():
            r, _ = sequence_logps(ref(batch["input_ids"], **fwd).logits, batch["labels"], *seqs)
        loss, metrics = dpo_loss(pol, r, 0.1, n)
        policy.zero_grad()
        loss.backward()
        results.append((batch["input_ids"].shape, loss, metrics, n, [p.grad.clone() for p in policy.parameters()]))
    (shape_a, loss_a, m_a, n_a, g_a), (shape_b, loss_b, m_b, n_b, g_b) = results
    assert shape_a[0] == 12 and shape_b[0] < 12  # 12 sequences in fewer rows
    assert torch.equal(n_a, n_b) and abs(m_a["reward_margin"].item()) > 1e-3
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for k in m_a:
        torch.testing.assert_close(m_b[k], m_a[k], rtol=1e-4, atol=1e-6, msg=k)
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_train_dpo_on_two_ranks_then_resume_on_one(sft_copy):
    tmp = sft_copy
    common = [*TINY, "--save_dir", tmp / "out", "--checkpoint_dir", tmp / "checkpoints", "--data_path",
              DEMO / "dpo.jsonl", "--batch_size", "2", "--log_interval", "1", "--learning_rate", "1e-4"]
    log = run_torchrun("trainer/train_dpo.py", *common, "--max_steps", "2", tmp=tmp)
    assert "weights identical on all 2 ranks" in log
    rows = read_metrics(tmp, "dpo")
    # step 1: the policy is still the reference, so every pair's loss is log 2 and every reward 0
    assert rows[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6) and rows[0]["reward_margin"] == 0
    for key in ("reward_accuracy", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp", "aux_loss"):
        assert key in rows[0]
    proc = run_script("trainer/train_dpo.py", *common, "--max_steps", "4", "--from_resume", "1",
                      "--loss_type", "sigmoid", tmp=tmp)
    assert "resumed from" in proc.stdout and "saved with world size 2, now 1" in proc.stdout
    assert [r["global_step"] for r in read_metrics(tmp, "dpo")] == [1, 2, 3, 4]
    assert (tmp / "out" / "dpo_64.pth").exists() and (tmp / "out" / "dpo_64.json").exists()
