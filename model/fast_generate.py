"""MiniMind's own decode loop behind transformers' generate(): a preallocated KV buffer, one RoPE table, no cache
objects, the same logits processors, stopping criteria and sampling call as transformers' loop.

    class MiniMindForCausalLM(MiniMindPreTrainedModel, FastGenerationMixin): ...
    model.generate(ids, max_new_tokens=64, do_sample=True, top_p=0.9)        # runs _fast_sample when it can
    model.generate(ids, max_new_tokens=64, compile_decode=True)              # + torch.compile of the decode step

Why a module of its own: it overrides `GenerationMixin._sample`, a private method of transformers whose signature
and calling convention may change in any release. tests/test_generate.py pins both (inspect.signature of the
pinned transformers against the recorded one) and fails loudly on an upgrade; the equality tests there check that
the tokens are exactly what transformers' own loop returns. Everything the override does not cover falls back to
transformers' loop.

The mixin expects a MiniMind-shaped model: `self.model` with `embed_tokens`, `layers` (each called as
layer(x, cos, sin, mask, token_mask, past_key_values=kv, kv_len=n)), `norm`, `rope(position_ids)` and
`build_mask(attention_mask, past_len, q_len, device)`, and `self.lm_head`. Imports torch and transformers only,
and is copied beside model_minimind.py into transformers-format exports (scripts/convert_model.py).
"""
import torch
import torch.nn.functional as F
from transformers import GenerationMixin
from transformers.cache_utils import DynamicCache


class KVBuffer:
    """K/V of every layer for MiniMind's own decode loop: [layers, B, n_kv, capacity, head_dim], filled left to right.

    update() writes the new positions in place and returns views of the filled prefix, so a decode step neither
    concatenates nor copies the cache. Allocated at the first update in the dtype the keys arrive in (bf16 under
    autocast), for min(max_len, first length + 256) positions, and doubled when full (an eos long before a large
    max_new_tokens must not cost the whole preallocation).
    """

    def __init__(self, n_layers, max_len):
        self.n_layers, self.max_len, self.pos = n_layers, max_len, 0
        self.k = self.v = None

    def update(self, k, v, layer_idx):
        end = self.pos + k.shape[2]
        if self.k is None or end > self.k.shape[3]:
            B, n_kv, _, d = k.shape
            size = min(self.max_len, max(end + 256, 2 * (0 if self.k is None else self.k.shape[3])))
            grown_k = k.new_empty(self.n_layers, B, n_kv, size, d)
            grown_v = v.new_empty(self.n_layers, B, n_kv, size, d)
            if self.k is not None:
                grown_k[..., :self.pos, :] = self.k[..., :self.pos, :]
                grown_v[..., :self.pos, :] = self.v[..., :self.pos, :]
            self.k, self.v = grown_k, grown_v
        self.k[layer_idx, :, :, self.pos:end] = k
        self.v[layer_idx, :, :, self.pos:end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]


class FastGenerationMixin(GenerationMixin):
    """GenerationMixin whose greedy/sampling loop runs over a KVBuffer in the common case (see _sample)."""

    def generate(self, *args, compile_decode=False, **kwargs):
        """transformers' generate(); compile_decode=True also runs the decode step of MiniMind's own loop (see
        _sample) through torch.compile (compiled once per model, reused by later calls)."""
        self._compile_decode = compile_decode
        try:
            return super().generate(*args, **kwargs)
        finally:
            self._compile_decode = False

    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                streamer=None, **model_kwargs):
        """transformers' generate() prepares everything (config, logits processors, stopping criteria, expansion
        for num_return_sequences, the streamer's prompt) and then calls this decoding loop for greedy search and
        sampling. The common case runs MiniMind's own loop over a preallocated KV buffer with the same processors,
        the same stopping rule and the same sampling call, so it returns exactly what GenerationMixin._sample would;
        anything else (return_dict_in_generate, a cache passed in or cache_implementation="static", inputs_embeds,
        synced_gpus, assisted decoding, extra model inputs) goes to GenerationMixin._sample.
        """
        compile_step = getattr(self, "_compile_decode", False)
        cache = model_kwargs.get("past_key_values")
        fast = (
            not generation_config.return_dict_in_generate
            and not synced_gpus
            and not getattr(generation_config, "is_assistant", False)
            and model_kwargs.get("use_cache", True)
            and type(cache) is DynamicCache and cache.get_seq_length() == 0
            and not getattr(cache, "_is_user_defined", False)
            and generation_config.max_length is not None
            and set(model_kwargs) <= {"attention_mask", "position_ids", "past_key_values", "use_cache",
                                      "logits_to_keep", "output_attentions", "output_hidden_states"}
            and not model_kwargs.get("output_attentions") and not model_kwargs.get("output_hidden_states")
        )
        given = model_kwargs.get("position_ids")
        if fast and given is not None:
            # transformers derives these from the mask exactly as this loop does; other (user) positions fall back
            mask = model_kwargs.get("attention_mask")
            P = input_ids.shape[1]
            expected = (mask.long().cumsum(-1) - 1).clamp(min=0) if mask is not None else \
                torch.arange(P, device=input_ids.device)[None]
            fast = given.shape[-1] == P and bool((given == expected).all())
        if not fast:
            return super()._sample(input_ids, logits_processor, stopping_criteria, generation_config,
                                   synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
        return self._fast_sample(input_ids, logits_processor, stopping_criteria, generation_config, streamer,
                                 model_kwargs.get("attention_mask"), compile_step)

    def _decode_step(self, ids, cos, sin, mask, kv):
        """One forward over new tokens on top of `kv` -> fp32 logits of each row's last position [B, vocab]."""
        x = self.model.embed_tokens(ids)
        kv_len = kv.pos + ids.shape[1]
        for layer in self.model.layers:
            x, _ = layer(x, cos, sin, mask, None, past_key_values=kv, kv_len=kv_len)
        kv.pos = kv_len
        return self.lm_head(self.model.norm(x[:, -1])).float()

    @torch.no_grad()
    def _fast_sample(self, input_ids, logits_processor, stopping_criteria, generation_config, streamer,
                     attention_mask, compile_step):
        B, P = input_ids.shape
        L = generation_config.max_length
        device = input_ids.device
        pad_token = generation_config._pad_token_tensor
        has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
        seq = input_ids.new_empty(B, max(L, P + 1))
        seq[:, :P] = input_ids
        kv = KVBuffer(len(self.model.layers), seq.shape[1])
        # RoPE table once: indexing it gives exactly what rope(position_ids) computes per step
        cos_t, sin_t = (t[0, 0] for t in self.model.rope(torch.arange(seq.shape[1], device=device)[None]))
        if attention_mask is None:
            valid = None
            pos = torch.arange(P, device=device)[None]
            mask = "causal" if P > 1 else "full"
        else:
            valid = torch.ones(B, seq.shape[1], dtype=torch.bool, device=device)
            valid[:, :P] = attention_mask.bool()
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            mask = self.model.build_mask(attention_mask, 0, P, device)
        step = self._decode_step
        if compile_step:
            if getattr(self, "_compiled_step", None) is None:
                self._compiled_step = torch.compile(self._decode_step, dynamic=True)
            step = self._compiled_step
        logits = self._decode_step(input_ids, cos_t[pos][:, None], sin_t[pos][:, None], mask, kv)
        next_pos = pos[:, -1] + 1  # [B] or [1]
        unfinished = torch.ones(B, dtype=torch.long, device=device)
        cur = P
        while True:
            scores = logits_processor(seq[:, :cur], logits)
            if generation_config.do_sample:
                tokens = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                tokens = torch.argmax(scores, dim=-1)
            if has_eos:
                tokens = tokens * unfinished + pad_token * (1 - unfinished)
            seq[:, cur] = tokens
            cur += 1
            unfinished = unfinished & ~stopping_criteria(seq[:, :cur], None)
            if streamer is not None:
                streamer.put(tokens.cpu())
            if unfinished.max() == 0 or cur >= seq.shape[1]:
                break
            step_mask = "full" if valid is None else valid[:, None, None, :cur]
            logits = step(tokens[:, None], cos_t[next_pos][:, None, None], sin_t[next_pos][:, None, None],
                          step_mask, kv)
            next_pos = next_pos + 1
        if streamer is not None:
            streamer.end()
        return seq[:, :cur].contiguous()
