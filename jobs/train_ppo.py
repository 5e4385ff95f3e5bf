"""PPO with per-step PRM reward on Ray Train: the policy writes the next step, the PRM scores it.

    ray start --head
    ray job submit --working-dir . -- python jobs/train_ppo.py --config mathprm/configs/ppo_arith.yaml \
        policy=$PWD/runs/arith/policy prm=$PWD/runs/arith/prm out_dir=$PWD/runs/arith/policy-ppo
    python jobs/train_ppo.py --config mathprm/configs/ppo_arith.yaml updates=20     # local Ray
    python jobs/train_ppo.py --config mathprm/configs/ppo_arith.yaml mode=full_solution advantage=grpo \
        outcome_reward=1.0 out_dir=runs/arith/policy-ppo-grpo
    python jobs/train_ppo.py policy=/models/Qwen2.5-Math-1.5B-Instruct prm=/models/my-prm \
        dataset=gsm8k:train eval_dataset=gsm8k use_gpu=true num_workers=8 precision=bf16 lora_r=16

Writes the PPO policy (a plain HF directory, plus ppo_summary.json, ppo_metrics.jsonl and
ppo_curves.png) to runs/arith/policy-ppo, reused unless overwrite=true; Ray Train checkpoints
go to runs/arith/ray_train/ppo-policy-ppo and an interrupted run resumes from them.
Fields: see `mathprm.train.ppo.PPOConfig` (`python jobs/train_ppo.py --help`).
"""

import sys

from mathprm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-ppo", *sys.argv[1:]]))
