"""The Ray Serve app for PRM-guided search: a policy, a PRM and an HTTP front composed by handles.

    serve run serve_configs/guided.yaml        # the app builder `build_app` reads its `args`
    curl -s localhost:8000/v1/solve -H 'content-type: application/json' -d '{"question":
        "Start with 6. Add 3, then multiply by 3. What is the result?", "strategy": "guided", "n": 8}'

Three deployments, each scaled and placed on its own (`serve_configs/guided.yaml`):

- `GeneratorDeployment` holds one `Generator` (`hf` here, `vllm` on a GPU). Concurrent
  `next_steps` / `rollouts` calls are merged by `@serve.batch` into one backend call per kind
  and sampling setting, the way `search.run_searches` merges searches in lockstep (every
  prefix keeps its own seed, so a search samples the same alone or merged, up to the float
  rounding that padding brings on `hf`). One backend call
  runs at a time, which a vLLM `LLM` object needs.
- `PRMDeployment` holds the Scorer that `prm` names (`mathprm.scorer.build_scorer`); its `score_solutions(questions, steps)` scores one
  search round's solutions and is `@serve.batch`ed, so the rounds of every concurrent request
  go through one forward pass in batches of `max_batch_size` solutions (`max_batch_size: 1` is
  the unbatched baseline: one call and one forward pass per solution). `stats()` reports the
  solutions per Serve batch.
- `SolveAPI`, the FastAPI ingress: `POST /v1/solve`, `POST /v1/solve/stream` (server-sent
  events: one `step` event per decided step, then `done`), `GET /healthz`, OpenAPI at `/docs`,
  and a web page at `/` (`static/`; what it reads besides the search is `page.py`).

The search itself is `search.run_search_async` over two handle adapters (`HandleGenerator`,
`HandleScorer`, which sends a `Score` request as one `score_solutions` call);
this module only turns HTTP into a `Problem` and a `SearchConfig` (`Solver`, which knows
nothing of HTTP or Ray) and results back into JSON. Bad input is a 4xx `{"error", "field"}`
naming the field, never a 5xx; a search still running after `limits.timeout_s` is cancelled
and answered 504, never left hanging.

An API key guards the app when the environment variable named by `api_key_env` (default
MATHPRM_API_KEY) is set where the app is built: every request but GET /healthz, the docs and
the web page's own files must then carry `Authorization: Bearer <key>` or `X-API-Key: <key>`, else it gets a 401
before its body is read. The key itself stays in that process; the ingress holds only its SHA-256.
"""

from mathprm.serve.app import SolveAPI, build_app
from mathprm.serve.config import ServeConfig, api_key_digest, load_serve_config
from mathprm.serve.solver import RequestError, Solver, SolveRequest

__all__ = ["RequestError", "ServeConfig", "SolveAPI", "SolveRequest", "Solver", "api_key_digest", "build_app",
           "load_serve_config"]
