"""Accuracy of a policy per decoding strategy, PRM-guided search included, on Ray.

    ray start --head
    ray job submit --working-dir . -- python jobs/evaluate.py --config mathprm/configs/eval_guided_arith.yaml \
        policy=$PWD/runs/arith/policy prm=$PWD/runs/arith/prm out=$PWD/runs/arith/eval.json \
        plot=$PWD/runs/arith/accuracy_vs_n.png
    python jobs/evaluate.py --config mathprm/configs/eval_guided_arith.yaml limit=50     # local Ray
    python jobs/evaluate.py --config mathprm/configs/eval_arith.yaml                     # no PRM: greedy, majority, pass
    python jobs/evaluate.py --policy /models/Qwen2.5-Math-1.5B --prm /models/my-prm --dataset math500 \
        --backend vllm --strategies greedy,majority@8,best_of_n@8,guided@8 num_actors=1

Problems flow through a Ray Data actor pool (`num_actors`, one generator and one PRM per
actor; each actor searches `batch_problems` problems in lockstep). Writes the JSON report (per
strategy: accuracy, samples_per_problem, generated_tokens, prm_scored_solutions; plus
diagnostics), one JSON line per problem beside it, and the accuracy-vs-N PNG (`plot`).
`mathprm evaluate` runs the same in one process. Fields: `mathprm.eval.evaluate.EvalConfig`
(`python jobs/evaluate.py --help`).
"""

import sys

from mathprm.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", "use_ray=true", *sys.argv[1:]]))
