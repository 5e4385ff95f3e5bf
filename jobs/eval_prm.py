"""Evaluate a PRM on solutions its policy samples: step AUROC, first-error F1, best-of-n, on Ray.

    ray start --head
    ray job submit --working-dir . -- python jobs/eval_prm.py --config mathprm/configs/eval_prm_arith.yaml \
        prm=$PWD/runs/arith/prm policy=$PWD/runs/arith/policy out=$PWD/runs/arith/prm_eval.json
    python jobs/eval_prm.py --config mathprm/configs/eval_prm_arith.yaml limit=50        # local Ray
    python jobs/eval_prm.py --config mathprm/configs/eval_prm_arith.yaml prm=oracle   # the upper bound

Problems flow through a Ray Data actor pool (`num_actors`, one generator + one scorer each).
Fields: see `mathprm.eval.prm.PRMEvalConfig` (`python jobs/eval_prm.py --help`).
"""

import sys

from mathprm.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate-prm", "use_ray=true", *sys.argv[1:]]))
