"""The `hf` generator backend: transformers, batched, one prefill per prefix shared by its samples.

A hand-written decoding loop rather than `model.generate`, for two reasons:
- sharing: each prompt is run through the model once and its KV cache is repeated for its
  `n` samples (`generate(num_return_sequences=n)` would prefill every copy);
- seeds: every sample draws from its own `torch.Generator`, seeded from
  `(Prefix.sample_seed(sampling, prefix index), sample index)`, so a sample does not depend on
  which other prompts share its batch (up to float rounding from padding).
Prompts are batched by length, and rows that have stopped are dropped from the batch (with
their KV cache) once a quarter of it has stopped, so rollouts of very different lengths do not
all pay for the longest. After the prefill, the cache of every full-attention layer gets room for
the tokens still to come (`_preallocate`): transformers' `DynamicLayer` concatenates the whole
cache at each decoding step, a copy that grows with the prefix and on CPU dominates a rollout
from a deep one.
With `prefix_cache_tokens` > 0, prompts' keys and values are kept across calls (a `PrefixCache`
LRU bounded by that many tokens, `mathprm.models.prefix`): a prompt that extends a kept one, as a
search's next round extends this round's prefix by the chosen step, prefills only its new tokens
on top of it (`_prefill`). Entries are matched by token ids, never text; an entry is the KV of its
prompt less the last token (the LRU keys an entry by its ids and the token after them), so a
prompt always runs at least its last token and gets its logits from that pass. The LRU drops an
entry that a newer one extends and evicts the least recently used past the bound; an entry is
tagged with its prompt's question, and `release(questions)` (the search drivers call it when a
search ends) frees what only those searches used; `clear_prefix_cache()` frees all of it (new
weights). `cache_stats()`: hits,
misses, tokens held (and bytes), evictions, and the prompt tokens prefilled against those a full
prefill would run. 0: no cache, every prompt prefilled whole.
Stopping at the separator is checked on the decoded text, so a separator that a tokenizer
merges into a longer token (".\\n\\n") still stops the step; the text is cut at its first
separator, as vLLM's `stop` strings do.
"""

from __future__ import annotations

import functools

from mathprm.generation import Prefix, Rollout, Sampling, StepSample, prefix_seed
from mathprm.models import loading
from mathprm.models.prefix import PrefixCached
from mathprm.prompts import DEFAULT_SYSTEM, Prompter
from mathprm.steps import StepFormat


class HFGenerator(PrefixCached):
    def __init__(
        self, model_dir: str, step_format: StepFormat, device: str | None = None, batch_prefixes: int = 16,
        system_prompt: str | None = DEFAULT_SYSTEM, chat: str = "auto", prefix_cache_tokens: int = 0,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.step_format = step_format
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        with loading(model_dir):
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        model = model.to(self.device)
        self.tokenizer.padding_side = "left"  # every row continues from its last column
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._attach(model, batch_prefixes, system_prompt, chat, prefix_cache_tokens)

    @classmethod
    def from_model(cls, model, tokenizer, step_format: StepFormat, batch_prefixes: int = 16,
                   system_prompt: str | None = DEFAULT_SYSTEM, chat: str = "auto") -> HFGenerator:
        """A generator over a model already in memory (PPO samples with the weights it is
        training, no copy); the model stays on its device. `tokenizer` is copied, not changed.
        No prefix cache: the weights change under it."""
        import copy

        self = cls.__new__(cls)
        self.step_format = step_format
        self.device = next(model.parameters()).device
        self.tokenizer = copy.copy(tokenizer)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._attach(model, batch_prefixes, system_prompt, chat)
        return self

    def _attach(self, model, batch_prefixes: int, system_prompt: str | None, chat: str,
                prefix_cache_tokens: int = 0) -> None:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        from mathprm.models.prefix import PrefixCache

        self.model = model
        self.prompter = Prompter(self.tokenizer, self.step_format, system_prompt, chat)
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos_ids = set(eos) | ({self.tokenizer.eos_token_id} - {None})
        self.batch_prefixes = batch_prefixes  # prompts per forward pass; each brings n rows
        # A kept prompt's KV must be every position's: sliding-window or linear-attention layers keep less.
        layers = DynamicCache(config=model.config).layers if prefix_cache_tokens else []
        if any(type(layer) is not DynamicLayer for layer in layers):
            raise ValueError("prefix_cache_tokens: the policy has sliding-window or linear-attention layers, whose "
                             "cache holds only part of a prompt; use 0")
        self.prefix_cache = PrefixCache(prefix_cache_tokens)

    def clear_prefix_cache(self) -> None:
        """Free every kept prompt (the weights changed); counters stay. `cache_stats()`: the
        `tokens_computed` are the prompt tokens prefilled, `tokens_full` those a prefill of every
        whole prompt would run."""
        self.prefix_cache.clear()

    def room(self, prefix: Prefix) -> int:
        return self.prompter.room(prefix.question, prefix.steps, self.context_length)

    def next_steps(self, prefixes: list[Prefix], n: int, sampling: Sampling) -> list[list[StepSample]]:
        sep = self.step_format.separator
        out = []
        for ids_list, reasons, lps in self._sample(prefixes, n, sampling, sampling.max_step_tokens, stop=sep):
            samples = []
            for ids, reason, lp in zip(ids_list, reasons, lps):
                text = self._decode(ids, reason).split(sep, 1)[0]
                samples.append(StepSample(text, len(ids), reason == "eos", reason == "length", tuple(ids), tuple(lp)))
            out.append(samples)
        return out

    def rollouts(self, prefixes: list[Prefix], n: int, sampling: Sampling) -> list[list[Rollout]]:
        out = []
        for ids_list, reasons, lps in self._sample(prefixes, n, sampling, sampling.max_solution_tokens, stop=None):
            rolls = []
            for ids, reason, lp in zip(ids_list, reasons, lps):
                text = self._decode(ids, reason)
                rolls.append(Rollout(self.step_format.split(text), text, len(ids), reason == "eos", reason == "length",
                                     tuple(ids), tuple(lp)))
            out.append(rolls)
        return out

    def _decode(self, ids: list[int], reason: str) -> str:
        return self.tokenizer.decode(ids[:-1] if reason == "eos" else ids, skip_special_tokens=True)

    def _sample(self, prefixes: list[Prefix], n: int, sampling: Sampling, max_tokens: int, stop: str | None):
        """Per prefix: (the n samples' generated token ids, their stop reasons, their tokens'
        log-probs: empty lists unless `sampling.logprobs`), where a reason is "eos",
        "separator" or "length".

        Prefixes are batched by prompt length (a deep prefix of a search has a long prompt and
        little left to write), so a batch holds rows that finish at similar times; each keeps
        its seed from its position in the call."""
        if n < 1:
            raise ValueError(f"n: must be >= 1, got {n}")
        prompts = [self.prompter.text(p.question, p.steps) for p in prefixes]
        encoded = [self.prompter.encode(text) for text in prompts]
        results: list = [None] * len(prefixes)
        for i, ids in enumerate(encoded):  # no room left in the context: empty samples, cut ("length")
            if len(ids) >= self.context_length:
                results[i] = ([[] for _ in range(n)], ["length"] * n, [[] for _ in range(n)])
        order = sorted((i for i in range(len(prefixes)) if results[i] is None), key=lambda i: len(prompts[i]))
        for start in range(0, len(order), self.batch_prefixes):
            members = order[start : start + self.batch_prefixes]
            seeds = [prefixes[i].sample_seed(sampling, i) for i in members]
            outs = self._sample_chunk([encoded[i] for i in members], seeds, n, sampling, max_tokens, stop,
                                      [prefixes[i].question for i in members])
            for i, out in zip(members, outs):
                results[i] = out
        return results

    def _sample_chunk(self, encoded: list[list[int]], seeds: list[int], n, sampling, max_tokens, stop, questions):
        import torch

        self.model.eval()  # a model shared with a trainer may have been left in train mode
        # Each row writes at most what its prompt leaves of the context.
        limits = [min(max_tokens, self.context_length - len(ids)) for ids in encoded for _ in range(n)]
        max_tokens = max(limits)
        with torch.inference_mode():
            logits, cache, mask, next_pos = self._prefill(encoded, questions)
            cache.batch_repeat_interleave(n)  # the prompt's work, shared by its n samples
            _preallocate(cache, max_tokens)
            logits = logits.repeat_interleave(n, 0)
            mask = mask.repeat_interleave(n, 0)
            next_pos = next_pos.repeat_interleave(n, 0)
            rows = len(encoded) * n
            gens = [torch.Generator(self.device).manual_seed(prefix_seed(seed, j)) for seed in seeds for j in range(n)]
            generated: list[list[int]] = [[] for _ in range(rows)]
            logprobs: list[list[float]] = [[] for _ in range(rows)]
            want_lp = sampling.logprobs and not sampling.greedy
            reasons: list[str | None] = [None] * rows
            active = list(range(rows))  # the rows still in the batch, in batch order
            for _ in range(max_tokens):
                tokens = self._pick(logits, [gens[r] for r in active], sampling)
                picked = tokens.tolist()  # one device-to-host copy per step, not one per row
                if want_lp:  # the learner's log-probs: softmax(logits / T), before top_p
                    lp = torch.log_softmax(logits / sampling.temperature, -1).gather(1, tokens[:, None])[:, 0].tolist()
                for k, r in enumerate(active):
                    if reasons[r] is not None:  # stopped earlier, not yet dropped from the batch
                        continue
                    tok = picked[k]
                    generated[r].append(tok)
                    if want_lp:
                        logprobs[r].append(lp[k])
                    if tok in self.eos_ids:
                        reasons[r] = "eos"
                    elif stop is not None and stop in self.tokenizer.decode(generated[r], skip_special_tokens=True):
                        reasons[r] = "separator"
                    elif len(generated[r]) >= limits[r]:
                        reasons[r] = "length"
                keep = [k for k, r in enumerate(active) if reasons[r] is None]
                if not keep:
                    break
                if len(keep) <= 0.75 * len(active):  # drop finished rows: their work is wasted
                    idx = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(idx)
                    mask, next_pos, tokens = mask[idx], next_pos[idx], tokens[idx]
                    active = [active[k] for k in keep]
                mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
                out = self.model(
                    input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos,
                    past_key_values=cache, use_cache=True,
                )
                next_pos = next_pos + 1
                logits = out.logits[:, -1].float()
        reasons = [r or "length" for r in reasons]
        return [(generated[i * n : (i + 1) * n], reasons[i * n : (i + 1) * n], logprobs[i * n : (i + 1) * n])
                for i in range(len(encoded))]

    def _prefill(self, encoded: list[list[int]], questions: list[str]):
        """Run the prompts: (each one's logits at its last position (B, V) float32, the KV cache,
        the attention mask (B, columns of the cache), each one's next position (B, 1)).

        Row i continues the longest kept prompt that its ids start with (c_i positions, right-padded
        with masked zeros to the longest, `padded_past`) by its remaining tokens, left-padded so that
        every row's last token is the last column: columns [c_i kept | pad | pad | rest]. Without a
        kept prompt (or a cache) that is today's left-padded prefill of whole prompts."""
        import torch

        from mathprm.models.prefix import padded_past, row_kv

        cache = self.prefix_cache
        found = [cache.find(ids, len(ids) - 1) if cache.max_tokens else (0, None) for ids in encoded]
        pasts = [None if entry is None else [[(k[:, :, :c], v[:, :, :c]) for k, v in entry.kv[0]]]
                 for c, entry in found]
        (past,), _, width = padded_past(pasts, 1)
        rest = [ids[c:] for ids, (c, _) in zip(encoded, found)]
        t = max(map(len, rest))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (t - len(r)) + r for r in rest], device=self.device)
        mask = torch.tensor([[1] * c + [0] * (width - c + t - len(r)) + [1] * len(r) for r, (c, _) in zip(rest, found)],
                            device=self.device)
        positions = torch.tensor([[0] * (t - len(r)) + list(range(c, c + len(r))) for r, (c, _) in zip(rest, found)],
                                 device=self.device)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         past_key_values=past if width else None)
        cache.count(tokens_full=sum(map(len, encoded)), tokens_computed=sum(map(len, rest)))
        if cache.max_tokens:
            kv = out.past_key_values
            for i, (ids, r, (c, _)) in enumerate(zip(encoded, rest, found)):
                if 1 < len(ids) <= cache.max_tokens + 1:  # the kept part: every position but the last
                    cache.put(ids, row_kv([kv], i, [(0, c), (width + t - len(r), width + t - 1)]),
                              torch.empty(len(ids) - 1, 0), (questions[i],))
        return out.logits[:, -1].float(), out.past_key_values, mask, positions[:, -1:] + 1

    def _pick(self, logits, gens, sampling: Sampling):
        """One next token per row of `logits`, row k drawing from `gens[k]`. Rows that already
        stopped but are still in the batch draw too; their tokens are never read."""
        import torch

        if sampling.greedy:
            return logits.argmax(-1)
        probs = torch.softmax(logits / sampling.temperature, dim=-1)
        if sampling.top_p < 1:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # Drop a token when the mass before it already reaches top_p (the first always stays).
            drop = (sorted_p.cumsum(-1) - sorted_p) >= sampling.top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        return torch.stack([torch.multinomial(probs[k], 1, generator=gen)[0] for k, gen in enumerate(gens)])


def _preallocate(cache, extra: int) -> None:
    """Give every full-attention layer of a `DynamicCache` room for `extra` more tokens, so
    that decoding writes each new key and value in place instead of concatenating the whole
    cache at every step (on CPU that copy dominates a rollout from a deep prefix).
    Layers of other kinds are left as they are."""
    from transformers.cache_utils import DynamicLayer

    for i, layer in enumerate(getattr(cache, "layers", [])):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.get_seq_length() > 0:
            cache.layers[i] = _preallocated_layer_class()(layer, extra)


@functools.cache
def _preallocated_layer_class():
    """The layer class, made on first use: transformers is imported lazily in this module."""
    import torch
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A `DynamicLayer` over buffers with room for `extra` tokens past the prompt: `update`
        writes in place and returns views of the filled part."""

        def __init__(self, layer, extra: int) -> None:
            super().__init__()
            self.dtype, self.device, self.is_initialized = layer.dtype, layer.device, True
            batch, heads, length, dim = layer.keys.shape
            self._k = layer.keys.new_empty(batch, heads, length + extra, dim)
            self._v = layer.values.new_empty(batch, heads, length + extra, layer.values.shape[-1])
            self._k[:, :, :length], self._v[:, :, :length] = layer.keys, layer.values
            self._set(length)

        def _set(self, length: int) -> None:
            self.length = length
            self.keys, self.values = self._k[:, :, :length], self._v[:, :, :length]

        def update(self, key_states, value_states, *args, **kwargs):
            n = key_states.shape[-2]
            if self.length + n > self._k.shape[-2]:  # past the room: grow as DynamicLayer does
                self._k = torch.cat([self.keys, key_states], dim=-2)
                self._v = torch.cat([self.values, value_states], dim=-2)
            else:
                self._k[:, :, self.length : self.length + n] = key_states
                self._v[:, :, self.length : self.length + n] = value_states
            self._set(self.length + n)
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_repeat_interleave(self, repeats: int) -> None:
            self._k, self._v = self._k.repeat_interleave(repeats, 0), self._v.repeat_interleave(repeats, 0)
            self._set(self.length)

        def batch_select_indices(self, indices) -> None:
            self._k, self._v = self._k[indices], self._v[indices]
            self._set(self.length)

    return PreallocatedLayer
