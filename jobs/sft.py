"""Supervised fine-tuning of the arithmetic policy on reference solutions, on Ray Train.

    ray job submit --working-dir . -- python jobs/sft.py --config mathprm/configs/sft_arith.yaml \
        out_dir=$PWD/runs/arith/policy      # absolute: the job runs in a temporary copy of .
    python jobs/sft.py --config mathprm/configs/sft_arith.yaml time_budget_min=5 preset=test   # local Ray

Writes a Hugging Face checkpoint (model + tokenizer + sft_summary.json) to runs/arith/policy,
reused unless overwrite=true; Ray Train checkpoints go to runs/arith/ray_train/sft-policy and
an interrupted run resumes from them. Fields: see `mathprm.train.sft.SFTConfig`.
"""

import sys

from mathprm.cli import main

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))
