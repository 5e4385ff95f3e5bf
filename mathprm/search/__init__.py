"""PRM-guided search at inference: strategies over a `Generator` and a `Scorer`.

    from mathprm.search import SearchConfig, run_search
    result = run_search("guided", generator, scorer, problem, SearchConfig(n=8))
    result.answer, [(s.text, s.score) for s in result.steps], result.usage

Strategies (`STRATEGIES`; `name@N` sets `n`, e.g. `guided@8`):

- `greedy`: one solution at temperature 0. No PRM.
- `majority`: `n` sampled solutions, the most frequent answer (self-consistency). No PRM.
- `best_of_n`: `n` sampled solutions, the PRM scores every step, the best solution by
  `aggregation` (last / min / prod / mean of its step scores) wins.
- `weighted_majority`: the same `n` scored solutions; each answer's weight is the sum of its
  solutions' aggregated scores (PRM-weighted vote); the answer with most weight wins.
- `guided`: sample `n` candidate next steps, keep the one the PRM scores
  highest, repeat until the policy ends the solution or `max_steps`.
- `guided_retry`: `guided`, but when every candidate scores below `retry_below` times its
  parent's score (the PRM says each one made the solution worse: a step the policy rarely gets
  right), `n` more candidates are sampled, up to `max_retries` times, and the best of all is
  kept. It spends more than `guided@N` only on such steps; its `Usage` says how much.
- `beam`: keep `beam_width` partial solutions; each samples `n` candidate next steps; of all
  candidates the `beam_width` with the highest last-step score survive (a finished one leaves
  the beam for the pool of finished solutions); the best finished one by `aggregation` wins.
- `dvts` (diverse verifier tree search, Beeching et al. 2024): `n // beam_width` independent
  subtrees, each a guided search with `beam_width` candidates per step, so `dvts@N` spends what
  `guided@N` spends per step; the best subtree by `aggregation` wins.
- `pass`: not a strategy but a metric over the same pool (any of `n` samples right; it needs
  the gold answer), so only `mathprm evaluate` computes it; `RUNNABLE` leaves it out.
- `mcts`: Monte-Carlo tree search with the PRM as value: `simulations` rounds of PUCT
  selection (c_puct), expansion by `n` sampled next steps, each scored by the PRM, and backup
  of the best child's score; the best finished solution found wins, and when none finished,
  the most visited path is completed by guided steps.

Partial solutions are compared by their last step's score (the PRM's value of the prefix);
finished solutions by `aggregation`. Candidate steps whose scores tie (to 6 decimals) are told
apart by `tie_break`: `first` (default) keeps the first sampled, `mode` the one the policy sampled
most often among the `n` (a PRM whose score is the prefix's minimum, like the demo's, ties every
candidate no worse than an earlier step; `mode` breaks those ties by the policy's preference,
which is no better than `first` on the demo's PRM, see docs/BENCHMARKS.md). Every result reports
what it cost (`Usage`: generated tokens, generator calls and samples, PRM calls and the
solutions and steps they scored), so strategies can be compared at equal compute.

Design. A strategy is a Python generator that *yields requests* (`NextSteps`, `Rollouts`,
`Score`, and `Chosen` when it has decided a step) and receives their results; it never calls a
model. Drivers execute the requests: `run_search` (one problem, synchronous), `run_searches`
(many problems in lockstep, each round's requests merged into one generator call and one
scorer call, which is what makes evaluation on a batched backend fast), and
`run_search_async` (the Serve app: awaits deployment handles, streams `Chosen` steps). Every
prefix carries its own seed, derived from (config seed, question, request count), so a search
samples the same whether it runs alone or merged with others. This module imports neither
torch, Ray nor vLLM.
"""

from mathprm.search.core import (
                                 Candidate,
                                 Chosen,
                                 NextSteps,
                                 Request,
                                 Rollouts,
                                 Score,
                                 ScoredStep,
                                 SearchConfig,
                                 SearchResult,
                                 Usage,
)
from mathprm.search.drivers import acquire, release, run_search, run_search_async, run_searches
from mathprm.search.strategies import RUNNABLE, STRATEGIES, Strategy, parse_strategy

__all__ = ["Candidate", "Chosen", "NextSteps", "Request", "Rollouts", "Score", "ScoredStep", "SearchConfig", "SearchResult", "Usage",
           "acquire", "release", "run_search", "run_search_async", "run_searches", "RUNNABLE", "STRATEGIES", "Strategy", "parse_strategy"]
