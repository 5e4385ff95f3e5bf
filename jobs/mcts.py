"""Step-score data by tree search (Math-Shepherd or OmegaPRM) over many problems, on Ray.

    ray start --head
    ray job submit --working-dir . -- python jobs/mcts.py --config mathprm/configs/mcts_arith.yaml \
        policy=$PWD/runs/arith/policy out_dir=$PWD/runs/arith/mcts
    python jobs/mcts.py --config mathprm/configs/mcts_arith.yaml method=omegaprm limit=50   # local Ray
    python jobs/mcts.py dataset=gsm8k:train policy=/models/Qwen2.5-Math-1.5B backend=vllm \
        gpus_per_actor=1 num_actors=4 out_dir=runs/gsm8k/mcts

Writes the step-score table to <out_dir>/labels/*.parquet (schema: mathprm.labels.steptable),
TRL stepwise-supervision rows to <out_dir>/trl/{soft,hard}.parquet and <out_dir>/summary.json;
rerunning with the same out_dir resumes (`repair=true` also moves unreadable part files into
<out_dir>/corrupt/ and labels their problems again). Fields: see `mathprm.labels.stage.MCTSConfig`
(`python jobs/mcts.py --help`).
"""

import sys

from mathprm.cli import main

if __name__ == "__main__":
    sys.exit(main(["mcts", *sys.argv[1:]]))
