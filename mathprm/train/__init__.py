"""Trainers on Ray Train: supervised fine-tuning of a policy (`sft`), PRM training on step-score
tables (`prm`), PPO with per-step PRM reward (`ppo`, its losses in `ppo_loss`), all built on one
skeleton (`run`: resume, metrics, checkpoints, the atomic final save) and one schedule.
"""
