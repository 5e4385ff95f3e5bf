"""Prefix reuse for PRM scoring: a shared prefix's keys and values computed once, within a call and across calls.

A step-by-step search scores N candidates that share (question, steps so far) and differ in their
last step, and the next round's candidates extend this round's chosen one. A causal model's output
at a position depends only on the tokens up to it, so a PRM reads the same numbers whether a
prefix's keys and values (its KV cache) come from the same forward pass or an earlier one. `run_shared`
therefore scores a call's encodings as

1. groups (`shared_groups`): encodings sorted by token ids and cut into runs that share a token-id
   prefix (the exact longest common prefix of the ids, so a tokenizer's merges at a step boundary
   cannot make it wrong);
2. one prefix pass per group, batched over groups, that starts from the longest cached prefix of it
   (`PrefixCache`) and computes only the tokens after it;
3. suffix passes: every member's remaining tokens, right-padded, on its group's prefix cache
   expanded to the batch, with attention masks and position ids continuing from the prefix.

A model enters as a `Forward`: it maps a pass's tokens to a few float values per position (a step
head's score, the log-probability of the next token, ...), which may depend on the token after each
position (`next_ids`). A group's prefix is its common prefix less one token, so every member keeps at
least one token of its own and the value at the prefix's last position reads a token the members
share; a cached prefix is keyed by its ids and that next token. Values at positions inside the
prefix come from the prefix pass.

`PrefixCache` keeps recent prefixes (keys, values and per-position values, on the model's device) in
an LRU bounded by a number of tokens, and counts hits, misses, and the tokens computed against the
tokens a full pass per encoding would compute. An entry records its owners (the questions whose
encodings made it): the search drivers call the scorer's and generator's `acquire(questions)`
when searches start and `release(questions)` when they end (`PrefixCached`), and an entry goes
when no running search owns it. The `hf` generator keeps its prompts' KV in the same
LRU (`mathprm.models.gen_hf`, with no per-position values). This module imports neither Ray nor vLLM.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

# forward(ids, next_ids, attention_mask, position_ids, caches) -> (B, T, F) float32 values.
# ids, next_ids (the token after each position; pad where unknown), position_ids: (B, T);
# attention_mask: (B, past + T); caches: one DynamicCache per model the values need, holding the
# past (`past` positions) and extended in place by the pass.
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[Any]], torch.Tensor]
KV = list[list[tuple[torch.Tensor, torch.Tensor]]]  # per model, per layer: keys, values (1, heads, n, head_dim)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two token-id sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.asarray(a[:n]) != np.asarray(b[:n])
    return int(differ.argmax()) if differ.any() else n


def shared_groups(encodings: Sequence[Sequence[int]]) -> list[tuple[int, list[int]]]:
    """Cut the encodings into groups that share a prefix: a list of (prefix length, indices).

    The encodings are sorted by their ids, so encodings with a long common prefix are neighbours,
    and cut into runs that maximise the tokens a shared prefix saves, sum over groups of
    (members - 1) x prefix length (a small dynamic programme over the sorted list). A group's
    prefix is its members' longest common prefix less one token (every member keeps a token of its
    own); a group of one keeps its whole encoding less its last token, so that the next call can
    reuse it from the cache."""
    order = sorted(range(len(encodings)), key=lambda i: tuple(encodings[i]))
    lcp = [common_prefix(encodings[a], encodings[b]) for a, b in zip(order, order[1:])]
    n = len(order)
    best, cut = [0] * (n + 1), [0] * (n + 1)  # best[j]: most tokens saved over order[:j]; cut[j]: its last run's start
    for j in range(1, n + 1):
        best[j], cut[j] = best[j - 1], j - 1  # order[j - 1] alone
        shared = None
        for i in range(j - 2, -1, -1):  # the run order[i:j]
            shared = lcp[i] if shared is None else min(shared, lcp[i])
            if shared <= 1:
                break
            gain = best[i] + (j - i - 1) * (shared - 1)
            if gain > best[j]:
                best[j], cut[j] = gain, i
    groups, j = [], n
    while j > 0:
        i = cut[j]
        members = order[i:j]
        if len(members) == 1:
            length = len(encodings[members[0]]) - 1
        else:
            length = min(lcp[i : j - 1]) - 1
        groups.append((max(0, length), members))
        j = i
    return groups[::-1]


@dataclasses.dataclass
class _Entry:
    key: np.ndarray  # (n + 1,) the prefix's ids and the token after it (the values at n - 1 read it)
    kv: KV  # keys and values of the n positions
    values: torch.Tensor  # (n, F) the Forward's values at those positions
    nbytes: int
    owners: set[Hashable]  # the questions (searches) whose encodings it serves; empty: untagged

    @property
    def tokens(self) -> int:
        return len(self.key) - 1


class PrefixCache:
    """Recent prefixes' KV caches keyed by token ids, an LRU over at most `max_tokens` cached tokens
    (0: nothing is kept, and the scorers take their plain full-pass path), and the counters of
    `stats`.

    Any cached prefix serves a later one up to their common ids (a prefix of an entry is as good
    as the entry), so an entry whose ids another one extends is dropped (its owners pass to the
    new one): a search's growing solution is held once, at its latest length. `acquire(owners)`
    counts a running search per owner, `release(owners)` ends one, and what only owners with no
    search left used is freed. Thread-safe: Serve scores in a worker thread while a finished
    request releases from the event loop."""

    def __init__(self, max_tokens: int) -> None:
        if max_tokens < 0:
            raise ValueError(f"prefix_cache_tokens: must be >= 0 (0: off), got {max_tokens}")
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next_id = 0
        self._lock = threading.RLock()
        self._running: Counter[Hashable] = Counter()  # searches per owner that acquired and not yet released
        self.counts = {"hits": 0, "misses": 0, "tokens_reused": 0, "evicted": 0, "released": 0, "tokens_computed": 0,
                       "tokens_full": 0}

    def find(self, target: Sequence[int], limit: int) -> tuple[int, _Entry | None]:
        """The cached entry that covers most of `target`'s first `limit` positions, and how many
        it covers: c positions are usable when the entry holds `target[:c + 1]` (the values at c - 1
        read token c). A hit or a miss is counted."""
        with self._lock:
            best, found = 0, None
            for key, entry in self._entries.items():
                c = min(entry.tokens, limit, common_prefix(entry.key, target) - 1)
                if c > best:
                    best, found = c, key
            if found is None:
                self.counts["misses"] += 1
                return 0, None
            self._entries.move_to_end(found)
            self.counts["hits"] += 1
            self.counts["tokens_reused"] += best
            return best, self._entries[found]

    def put(self, key: Sequence[int], kv: KV, values: torch.Tensor, owners: Iterable[Hashable] = ()) -> None:
        """Keep the prefix `key[:-1]` (its KV `kv` and `values`) for `owners`, unless an entry
        already holds it (that entry gains the owners) or it alone is over the bound; evict the
        least recently used entries beyond the bound."""
        tokens = len(key) - 1
        if tokens < 1 or tokens > self.max_tokens:
            return
        key, owners = np.asarray(key), set(owners)
        with self._lock:
            for k, entry in list(self._entries.items()):
                shared = common_prefix(entry.key, key)
                if shared == len(key):  # already held, at this length or longer
                    entry.owners |= owners
                    self._entries.move_to_end(k)
                    return
                if shared == len(entry.key):  # the new one extends it
                    owners |= self._entries.pop(k).owners
            nbytes = values.nbytes + sum(t.nbytes for layers in kv for pair in layers for t in pair)
            self._entries[self._next_id] = _Entry(key, kv, values, nbytes, owners)
            self._next_id += 1
            while self.held_tokens > self.max_tokens:
                self._entries.popitem(last=False)
                self.counts["evicted"] += 1

    def acquire(self, owners: Iterable[Hashable]) -> None:
        """A search per item of `owners` (a question may come twice) has started."""
        with self._lock:
            self._running.update(owners)

    def release(self, owners: Iterable[Hashable]) -> None:
        """A search per item of `owners` has ended; an owner with no search left (or that never
        acquired) is dropped from every entry, and the entries no one else owns go. Untagged
        entries stay (the LRU bound frees them)."""
        with self._lock:
            ended = set()
            for owner in owners:
                if self._running[owner] > 1:
                    self._running[owner] -= 1
                else:
                    self._running.pop(owner, None)
                    ended.add(owner)
            owners = ended
            for k, entry in list(self._entries.items()):
                if entry.owners & owners:
                    entry.owners -= owners
                    if not entry.owners:
                        del self._entries[k]
                        self.counts["released"] += 1

    def clear(self) -> None:
        """Drop every entry (the model's weights changed); counters and running searches stay."""
        with self._lock:
            self._entries.clear()

    @property
    def held_tokens(self) -> int:
        return sum(e.tokens for e in self._entries.values())

    def count(self, **counts: int) -> None:
        """Add to the counters (`tokens_computed=`, `tokens_full=`)."""
        with self._lock:
            for name, n in counts.items():
                self.counts[name] += n

    def count_full(self, tokens: int) -> None:
        """A full pass over `tokens` tokens ran (the plain path)."""
        self.count(tokens_computed=tokens, tokens_full=tokens)

    def stats(self) -> dict[str, Any]:
        """What the cache holds (entries, tokens, bytes on the device) and has done: hits and misses
        of prefix lookups, tokens reused from it, entries evicted and released, and the tokens the
        model computed against those a full pass per solution would compute."""
        with self._lock:
            return {"max_tokens": self.max_tokens, "entries": len(self._entries), "held_tokens": self.held_tokens,
                    "held_bytes": sum(e.nbytes for e in self._entries.values()), **self.counts}


class PrefixCached:
    """What a Scorer or Generator holding a `PrefixCache` as `prefix_cache` offers its drivers:
    `cache_stats()`, and `acquire(questions)` / `release(questions)`, which the search drivers
    call when searches start and end."""

    prefix_cache: PrefixCache

    def cache_stats(self) -> dict[str, Any]:
        """The prefix cache's holdings and counters (`PrefixCache.stats`)."""
        return self.prefix_cache.stats()

    def acquire(self, questions: Sequence[str]) -> None:
        """Searches on `questions` start (one per item)."""
        self.prefix_cache.acquire(questions)

    def release(self, questions: Sequence[str]) -> None:
        """Searches on `questions` have ended: free the prefixes no running search uses."""
        self.prefix_cache.release(questions)


# ----------------------------------------------------------------------------- running


def row_kv(caches: Sequence[Any], row: int, spans: Sequence[tuple[int, int]]) -> KV:
    """Row `row` of `caches`, the positions of `spans` ([lo, hi) pairs) concatenated, as new tensors."""
    return [[(torch.cat([k[row : row + 1, :, lo:hi] for lo, hi in spans], dim=2),
              torch.cat([v[row : row + 1, :, lo:hi] for lo, hi in spans], dim=2))
             for k, v, *_ in cache] for cache in caches]


def padded_past(kvs: Sequence[KV | None], n_models: int) -> tuple[list[Any], list[int], int]:
    """One transformers DynamicCache per model holding each row's KV right-padded with zeros to
    the longest: (caches, each row's length, the padded width)."""
    from transformers import DynamicCache  # imported when a pass runs: importing this module stays light

    lengths = [0 if kv is None else kv[0][0][0].shape[2] for kv in kvs]
    width = max(lengths)
    if width == 0:
        return [DynamicCache() for _ in range(n_models)], lengths, 0
    like = next(kv for kv, n in zip(kvs, lengths) if n)  # shapes and dtype for the rows with no past
    caches = []
    for m in range(n_models):
        layers = []
        for layer, pair in enumerate(like[m]):
            layers.append(tuple(
                torch.cat([t.new_zeros(*t.shape[:2], width, t.shape[3]) if n == 0 else
                           torch.nn.functional.pad(kv[m][layer][which], (0, 0, 0, width - n))
                           for kv, n in zip(kvs, lengths)])
                for which, t in enumerate(pair)))
        caches.append(DynamicCache(ddp_cache_data=layers))
    return caches, lengths, width


def _pass(forward: Forward, n_models: int, rows: Sequence[tuple[KV | None, list[int], list[int]]], pad_id: int,
          device: torch.device) -> tuple[torch.Tensor, list[Any], list[int], int]:
    """One batched pass: row r continues its past KV (None: none) with tokens `ids`, `next_ids`
    (as many). Returns the (B, T, F) values, the caches after the pass, each row's past length
    and the padded past width."""
    caches, lengths, width = padded_past([kv for kv, _, _ in rows], n_models)
    t = max(len(ids) for _, ids, _ in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    nxt = torch.full_like(ids, pad_id)
    mask = torch.zeros((len(rows), width + t), dtype=torch.long)
    for r, ((_, seq, after), n) in enumerate(zip(rows, lengths)):
        ids[r, : len(seq)] = torch.tensor(seq)
        nxt[r, : len(after)] = torch.tensor(after)
        mask[r, :n] = 1
        mask[r, width : width + len(seq)] = 1
    positions = torch.tensor(lengths)[:, None] + torch.arange(t)[None]
    values = forward(ids.to(device), nxt.to(device), mask.to(device), positions.to(device), caches)
    return values, caches, lengths, width


def run_shared(forward: Forward, n_models: int, encodings: Sequence[Sequence[int]], cache: PrefixCache,
        batch_size: int, pad_id: int, device: torch.device,
        owners: Sequence[Hashable] | None = None) -> list[torch.Tensor]:
    """The (len(ids), F) values of `forward` at every position of each encoding, each group of
    encodings sharing a prefix running it once (module docstring). The next token of an
    encoding's last position is unknown: its values there are the `forward`'s at a pad.
    `owners[i]` (the question of encoding i) tags the cached prefixes encoding i helped make."""
    encodings = [list(e) for e in encodings]
    groups = shared_groups(encodings)
    cache.count(tokens_full=sum(map(len, encodings)))
    # Prefixes: start from the longest cached one, compute the rest in batches of groups.
    prefix: list[tuple[KV | None, torch.Tensor | None]] = [(None, None)] * len(groups)
    todo = []
    for g, (length, members) in enumerate(groups):
        if length == 0:
            continue
        ids = encodings[members[0]]
        c, entry = cache.find(ids[: length + 1], length) if cache.max_tokens else (0, None)
        base = None if entry is None else [[(k[:, :, :c], v[:, :, :c]) for k, v in layers] for layers in entry.kv]
        if c == length:
            prefix[g] = base, entry.values[:c]
        else:
            todo.append((g, c, base, None if entry is None else entry.values[:c]))
    todo.sort(key=lambda job: groups[job[0]][0] - job[1])
    for lo in range(0, len(todo), batch_size):
        chunk = todo[lo : lo + batch_size]
        rows = []
        for g, c, base, _ in chunk:
            length, ids = groups[g][0], encodings[groups[g][1][0]]
            rows.append((base, ids[c:length], ids[c + 1 : length + 1]))
        values, caches, lengths, width = _pass(forward, n_models, rows, pad_id, device)
        for r, (g, c, base, old) in enumerate(chunk):
            length, ids = groups[g][0], encodings[groups[g][1][0]]
            new = length - c
            cache.count(tokens_computed=new)
            kv = row_kv(caches, r, [(0, c), (width, width + new)])
            vals = values[r, :new].clone() if old is None else torch.cat([old, values[r, :new]])
            prefix[g] = kv, vals
            if cache.max_tokens:
                cache.put(ids[: length + 1], kv, vals, () if owners is None else {owners[i] for i in groups[g][1]})
    # Suffixes: each member's own tokens on its group's prefix.
    jobs = sorted(((groups[g][0], len(encodings[i]), g, i) for g, (_, members) in enumerate(groups) for i in members))
    out: list[torch.Tensor | None] = [None] * len(encodings)
    for lo in range(0, len(jobs), batch_size):
        chunk = jobs[lo : lo + batch_size]
        rows = [(prefix[g][0], encodings[i][length:], encodings[i][length + 1 :] + [pad_id])
                for length, _, g, i in chunk]
        values, _, _, _ = _pass(forward, n_models, rows, pad_id, device)
        for r, (length, n, g, i) in enumerate(chunk):
            cache.count(tokens_computed=n - length)
            own = values[r, : n - length]
            out[i] = own if prefix[g][1] is None else torch.cat([prefix[g][1], own])
    return out
