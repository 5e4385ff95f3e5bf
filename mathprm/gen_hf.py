"""The `hf` generator backend: transformers, batched, one prefill per prefix shared by its samples.

A hand-written decoding loop rather than `model.generate`, for two reasons:
- sharing: each prompt is run through the model once and its KV cache is repeated for its
  `n` samples (`generate(num_return_sequences=n)` would prefill every copy);
- seeds: every sample draws from its own `torch.Generator`, seeded from
  `(Prefix.sample_seed(sampling, prefix index), sample index)`, so a sample does not depend on
  which other prompts share its batch (up to float rounding from padding).
Stopping at the separator is checked on the decoded text, so a separator that a tokenizer
merges into a longer token (".\\n\\n") still stops the step; the text is cut at its first
separator, as vLLM's `stop` strings do.
"""

from __future__ import annotations

from mathprm.generation import Prefix, Rollout, Sampling, StepSample, prefix_seed
from mathprm.steps import StepFormat


class HFGenerator:
    def __init__(
        self, model_dir: str, step_format: StepFormat, device: str | None = None, batch_prefixes: int = 16
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.step_format = step_format
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"  # every row continues from its last column
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos_ids = set(eos) | ({self.tokenizer.eos_token_id} - {None})
        self.batch_prefixes = batch_prefixes  # prompts per forward pass; each brings n rows

    def next_steps(self, prefixes: list[Prefix], n: int, sampling: Sampling) -> list[list[StepSample]]:
        sep = self.step_format.separator
        out = []
        for ids_list, reasons in self._sample(prefixes, n, sampling, sampling.max_step_tokens, stop=sep):
            samples = []
            for ids, reason in zip(ids_list, reasons):
                text = self._decode(ids, reason).split(sep, 1)[0]
                samples.append(StepSample(text, len(ids), reason == "eos", reason == "length"))
            out.append(samples)
        return out

    def rollouts(self, prefixes: list[Prefix], n: int, sampling: Sampling) -> list[list[Rollout]]:
        out = []
        for ids_list, reasons in self._sample(prefixes, n, sampling, sampling.max_solution_tokens, stop=None):
            rolls = []
            for ids, reason in zip(ids_list, reasons):
                text = self._decode(ids, reason)
                rolls.append(Rollout(self.step_format.split(text), text, len(ids), reason == "eos", reason == "length"))
            out.append(rolls)
        return out

    def _decode(self, ids: list[int], reason: str) -> str:
        return self.tokenizer.decode(ids[:-1] if reason == "eos" else ids, skip_special_tokens=True)

    def _sample(self, prefixes: list[Prefix], n: int, sampling: Sampling, max_tokens: int, stop: str | None):
        """Per prefix: (the n samples' generated token ids, their stop reasons), where a reason
        is "eos", "separator" or "length"."""
        if n < 1:
            raise ValueError(f"n: must be >= 1, got {n}")
        results = []
        for start in range(0, len(prefixes), self.batch_prefixes):
            chunk = prefixes[start : start + self.batch_prefixes]
            results += self._sample_chunk(chunk, start, n, sampling, max_tokens, stop)
        return results

    def _sample_chunk(self, chunk, start, n, sampling, max_tokens, stop):
        import torch

        prompts = [p.prompt(self.step_format) for p in chunk]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
        mask = enc["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row counts from 0
        with torch.inference_mode():
            out = self.model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=positions, use_cache=True)
            cache = out.past_key_values
            cache.batch_repeat_interleave(n)  # the prompt's work, shared by its n samples
            logits = out.logits[:, -1].float().repeat_interleave(n, 0)
            mask = mask.repeat_interleave(n, 0)
            next_pos = positions[:, -1:].repeat_interleave(n, 0) + 1
            rows = len(chunk) * n
            gens = [
                torch.Generator(self.device).manual_seed(prefix_seed(p.sample_seed(sampling, start + i), j))
                for i, p in enumerate(chunk)
                for j in range(n)
            ]
            generated: list[list[int]] = [[] for _ in range(rows)]
            reasons: list[str | None] = [None] * rows
            for _ in range(max_tokens):
                tokens = self._pick(logits, gens, reasons, sampling)
                for r in range(rows):
                    if reasons[r] is not None:
                        continue
                    tok = int(tokens[r])
                    generated[r].append(tok)
                    if tok in self.eos_ids:
                        reasons[r] = "eos"
                    elif stop is not None and stop in self.tokenizer.decode(generated[r], skip_special_tokens=True):
                        reasons[r] = "separator"
                if all(r is not None for r in reasons):
                    break
                mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
                out = self.model(
                    input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos,
                    past_key_values=cache, use_cache=True,
                )
                next_pos = next_pos + 1
                logits = out.logits[:, -1].float()
        reasons = [r or "length" for r in reasons]
        return [(generated[i * n : (i + 1) * n], reasons[i * n : (i + 1) * n]) for i in range(len(chunk))]

    def _pick(self, logits, gens, reasons, sampling: Sampling):
        """One next token per row (rows already stopped get the pad id, which is never read)."""
        import torch

        if sampling.greedy:
            return logits.argmax(-1)
        probs = torch.softmax(logits / sampling.temperature, dim=-1)
        if sampling.top_p < 1:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # Drop a token when the mass before it already reaches top_p (the first always stays).
            drop = (sorted_p.cumsum(-1) - sorted_p) >= sampling.top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        tokens = torch.full((len(gens),), self.tokenizer.pad_token_id, dtype=torch.long, device=logits.device)
        for r, gen in enumerate(gens):
            if reasons[r] is None:
                tokens[r] = torch.multinomial(probs[r], 1, generator=gen)[0]
        return tokens
