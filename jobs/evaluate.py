"""Accuracy of a policy per decoding strategy (greedy, majority@k, pass@k).

    python jobs/evaluate.py --config jobs/configs/eval_arith.yaml
    python jobs/evaluate.py --policy runs/arith/policy --dataset arith:hard --limit 200 \
        --strategies greedy,majority@16,pass@16 --out runs/arith/eval/policy.json
    python jobs/evaluate.py --policy /models/Qwen2.5-Math-1.5B --dataset math500 --backend vllm

Writes the JSON report (per strategy: accuracy, n_problems, samples_per_problem,
generated_tokens; plus diagnostics) and one JSON line per problem beside it. Runs in this
process: no Ray cluster needed. Fields: see `mathprm.evaluate.EvalConfig`.
"""

import sys

from mathprm.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
