"""model.generate(): MiniMind's own decode loop (preallocated KV buffer) against transformers' own loop.

generate() with return_dict_in_generate=True always runs GenerationMixin._sample over a DynamicCache, so it is the
reference the fast path must reproduce token for token (greedy, seeded sampling, eos, padding, streamer, stopping).

    python -m pytest tests/test_generate.py -q
"""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM  # noqa: E402

VOCAB = 128
VARIANTS = [dict(use_moe=False, headwise_attn_output_gate=False), dict(use_moe=False, headwise_attn_output_gate=True),
            dict(use_moe=True, headwise_attn_output_gate=False), dict(use_moe=True, headwise_attn_output_gate=True)]
VARIANT_IDS = ["dense", "dense-gate", "moe", "moe-gate"]


def tiny_model(seed=0, **kw):
    """Weights drawn with std 0.2: at the default init a tiny model's greedy choice just repeats the last token,
    which any decode loop would reproduce; these give varied continuations."""
    torch.manual_seed(seed)
    cfg = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=VOCAB, **kw)
    model = MiniMindForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model


def left_padded(lengths=(9, 4, 6), seed=1):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


def hf_generate(model, *args, **kw):
    """transformers' own decoding loop (return_dict_in_generate sends generate() there)."""
    return model.generate(*args, return_dict_in_generate=True, **kw).sequences


def spy_on_fast_path(model, monkeypatch):
    calls = []
    original = model._fast_sample
    monkeypatch.setattr(model, "_fast_sample", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("kw", VARIANTS, ids=VARIANT_IDS)
def test_greedy_equals_transformers_loop_batch1_and_left_padded(kw, monkeypatch):
    model = tiny_model(**kw)
    calls = spy_on_fast_path(model, monkeypatch)
    ids, mask = left_padded()
    gen = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    single = model.generate(ids[:1], **gen)
    batch = model.generate(ids, attention_mask=mask, **gen)
    assert len(calls) == 2  # both went through the fast loop
    assert torch.equal(single, hf_generate(model, ids[:1], **gen))
    assert torch.equal(batch, hf_generate(model, ids, attention_mask=mask, **gen))
    assert batch.shape == (3, ids.shape[1] + 12) and torch.equal(batch[:, :ids.shape[1]], ids)
    # transformers' StaticCache path still works with this attention and agrees too
    assert torch.equal(model.generate(ids, attention_mask=mask, cache_implementation="static", **gen), batch)


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens():
    """generate(compile_decode=True): the decode step through torch.compile (opt-in, meant for CUDA) decodes a
    left-padded batch exactly as the eager loop does (one compile, ~15 s on CPU)."""
    model = tiny_model(headwise_attn_output_gate=True)
    ids, mask = left_padded()
    gen = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=mask)
    assert torch.equal(model.generate(ids, compile_decode=True, **gen), model.generate(ids, **gen))
    assert not model._compile_decode  # the flag does not outlive the call


def test_long_generation_grows_the_kv_buffer():
    # the buffer starts at prompt + 256 positions and doubles: 300 new tokens cross that boundary
    model = tiny_model()
    ids, _ = left_padded()
    gen = dict(max_new_tokens=300, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(ids[:1], **gen), hf_generate(model, ids[:1], **gen))


def test_greedy_equals_transformers_loop_under_bf16_autocast():
    model = tiny_model(use_moe=True, headwise_attn_output_gate=True)
    ids, mask = left_padded()
    gen = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = model.generate(ids, attention_mask=mask, **gen)
        ref = hf_generate(model, ids, attention_mask=mask, **gen)
    assert torch.equal(fast, ref)


def test_seeded_sampling_is_reproducible_and_equals_transformers_sampling():
    model = tiny_model(use_moe=True)
    ids, mask = left_padded()
    gen = dict(max_new_tokens=10, do_sample=True, temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.2,
               num_return_sequences=2, pad_token_id=0, eos_token_id=None)
    runs = []
    for fn in (model.generate, model.generate, lambda *a, **k: hf_generate(model, *a, **k)):
        torch.manual_seed(123)
        runs.append(fn(ids, attention_mask=mask, **gen))
    assert runs[0].shape == (6, ids.shape[1] + 10)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    assert torch.equal(runs[0][0::2, :ids.shape[1]], ids)  # rows grouped by prompt, as transformers expands them
    torch.manual_seed(124)
    assert not torch.equal(model.generate(ids, attention_mask=mask, **gen), runs[0])


def test_eos_stops_rows_and_pads_finished_ones():
    model = tiny_model()
    ids, mask = left_padded()
    sample = dict(max_new_tokens=8, do_sample=True, top_k=0, pad_token_id=0)

    def generate(fn=model.generate, **kw):
        torch.manual_seed(7)
        return fn(ids, attention_mask=mask, **sample, **kw)

    free = generate(eos_token_id=None)
    P = ids.shape[1]
    # eos := a token some row r first emits at step j >= 1: row r stops there, the others at their own first eos
    rows = free[:, P:].tolist()
    r, j = next((r, j) for r in range(3) for j in range(1, 8) if rows[r][j] not in rows[r][:j])
    eos = rows[r][j]
    out = generate(eos_token_id=eos)
    assert torch.equal(out, generate(lambda *a, **k: hf_generate(model, *a, **k), eos_token_id=eos))
    for row in range(3):
        stop = P + (rows[row].index(eos) + 1 if eos in rows[row] else 8)
        assert torch.equal(out[row, :stop], free[row, :stop])
        assert (out[row, stop:] == 0).all()  # finished rows are padded with pad_token_id
    assert out[r, P + j] == eos
    # a list of eos ids works the same way
    assert torch.equal(generate(eos_token_id=[eos, 1]),
                       generate(lambda *a, **k: hf_generate(model, *a, **k), eos_token_id=[eos, 1]))
    # all rows done after one step -> the output is shorter than max_new_tokens, as transformers returns it
    early = generate(eos_token_id=[row[0] for row in rows])
    assert torch.equal(early, free[:, :P + 1])


def test_min_new_tokens_and_stopping_criteria_called_per_step():
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAfter(StoppingCriteria):
        def __init__(self, n):
            self.n, self.seen = n, []

        def __call__(self, input_ids, scores, **kwargs):
            self.seen.append((input_ids.shape[1], scores))
            return torch.full((input_ids.shape[0],), len(self.seen) >= self.n, dtype=torch.bool)

    model = tiny_model(use_moe=True, headwise_attn_output_gate=True)
    ids, mask = left_padded()
    stop = StopAfter(4)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0,
                         stopping_criteria=StoppingCriteriaList([stop]))
    P = ids.shape[1]
    assert out.shape[1] == P + 4
    # called once per new token with the sequence so far; scores are None as in transformers without output_scores
    assert stop.seen == [(P + 1, None), (P + 2, None), (P + 3, None), (P + 4, None)]
    # min_new_tokens keeps eos out until then
    eos_first = model.generate(ids[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                               eos_token_id=int(out[0, P]))
    assert eos_first.shape[1] == ids.shape[1] + 6 and int(out[0, P]) not in eos_first[0, P:P + 5].tolist()


def test_streamers_receive_prompt_then_each_token():
    from transformers import TextIteratorStreamer

    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            self.ended = True

    model = tiny_model()
    ids, _ = left_padded()
    rec = Recorder()
    out = model.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None,
                         streamer=rec)
    assert rec.ended and len(rec.puts) == 6
    assert torch.equal(rec.puts[0], ids[:1])
    assert torch.equal(torch.cat([p.view(-1) for p in rec.puts[1:]]), out[0, ids.shape[1]:])

    from test_model import word_tokenizer
    tok = word_tokenizer()
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    out = model.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None,
                         streamer=streamer)
    assert "".join(streamer).split() == tok.decode(out[0, ids.shape[1]:]).split()


def test_unsupported_options_fall_back_to_transformers(monkeypatch):
    model = tiny_model()
    calls = spy_on_fast_path(model, monkeypatch)
    ids, _ = left_padded()
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    out = model.generate(ids[:1], num_beams=2, **gen)
    res = model.generate(ids[:1], output_scores=True, return_dict_in_generate=True, **gen)
    shifted = model.generate(ids[:1], position_ids=torch.arange(5, 5 + ids.shape[1])[None], **gen)
    assert calls == [] and out.shape[1] == ids.shape[1] + 4 and len(res.scores) == 4
    assert shifted.shape[1] == ids.shape[1] + 4
    model.generate(ids[:1], position_ids=torch.arange(ids.shape[1])[None], **gen)  # the usual positions: fast
    assert calls == [1]


# ------------------------------------------------------------------------------------------------ the private contract

# What model/fast_generate.py overrides, as the pinned transformers (requirements.txt) defines it. A new transformers
# that changes either fails here first, instead of silently decoding differently or falling back everywhere.
SAMPLE_SIGNATURE = (
    "(self: 'GenerativePreTrainedModel', input_ids: torch.LongTensor, logits_processor: "
    "transformers.generation.logits_process.LogitsProcessorList, stopping_criteria: "
    "transformers.generation.stopping_criteria.StoppingCriteriaList, generation_config: "
    "transformers.generation.configuration_utils.GenerationConfig, synced_gpus: bool = False, streamer: "
    "Optional[ForwardRef('BaseStreamer')] = None, **model_kwargs) -> "
    "transformers.generation.utils.GenerateDecoderOnlyOutput | "
    "transformers.generation.utils.GenerateEncoderDecoderOutput | torch.LongTensor")
SAMPLE_SOURCE_SHA256 = "9f5d2e3906df6579"  # first 16 hex digits of sha256(inspect.getsource(GenerationMixin._sample))


def test_pinned_transformers_sample_is_the_one_fast_generate_was_written_against():
    import hashlib
    import inspect

    import transformers
    from transformers import GenerationMixin
    from transformers.generation.utils import GENERATION_MODES_MAPPING, GenerationMode

    from model.fast_generate import FastGenerationMixin

    upgrade = (f"transformers {transformers.__version__} changed GenerationMixin._sample, which "
               "model/fast_generate.py overrides: compare its loop (processors, stopping, padding of finished rows, "
               "streamer calls) with the new one, adapt FastGenerationMixin._sample/_fast_sample, run "
               "tests/test_generate.py, then record the new value here")
    assert str(inspect.signature(GenerationMixin._sample)) == SAMPLE_SIGNATURE, upgrade
    source = hashlib.sha256(inspect.getsource(GenerationMixin._sample).encode()).hexdigest()[:16]
    assert source == SAMPLE_SOURCE_SHA256, upgrade
    # greedy search and sampling are both dispatched to _sample, by name, on the model's class
    assert GENERATION_MODES_MAPPING[GenerationMode.GREEDY_SEARCH] == "_sample"
    assert GENERATION_MODES_MAPPING[GenerationMode.SAMPLE] == "_sample"
    assert MiniMindForCausalLM._sample is FastGenerationMixin._sample
    # the override takes exactly the parameters transformers passes
    ours, theirs = (inspect.signature(f).parameters for f in (FastGenerationMixin._sample, GenerationMixin._sample))
    assert [(p.name, p.kind, p.default) for p in ours.values()] == \
        [(p.name, p.kind, p.default) for p in theirs.values()]
