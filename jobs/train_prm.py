"""Train a process reward model on tree-search step labels (BCE on soft scores), on Ray Train.

    ray start --head
    ray job submit --working-dir . -- python jobs/train_prm.py --config mathprm/configs/prm_arith.yaml \
        data=$PWD/runs/arith/mcts base=$PWD/runs/arith/policy out_dir=$PWD/runs/arith/prm
    python jobs/train_prm.py --config mathprm/configs/prm_arith.yaml epochs=2       # local Ray
    python jobs/train_prm.py data=runs/gsm8k/mcts/trl/soft.parquet separator='"\n\n"' \
        base=/models/Qwen2.5-Math-1.5B use_gpu=true num_workers=8 precision=bf16 lora_r=16 \
        out_dir=runs/gsm8k/prm

Writes the PRM (the backbone as an HF causal LM, reference/ (the frozen base the likelihood
features come from), prm_head.safetensors, tokenizer, prm_config.json, prm_summary.json) to
runs/arith/prm, reused unless overwrite=true; Ray Train checkpoints go to
runs/arith/ray_train/prm-prm and an interrupted run resumes from them.
Fields: see `mathprm.train.prm.TrainPRMConfig` (`python jobs/train_prm.py --help`).
"""

import sys

from mathprm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-prm", *sys.argv[1:]]))
