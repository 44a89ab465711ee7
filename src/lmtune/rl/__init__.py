"""Alignment by reinforcement learning: a reward model (`task: reward`) and GRPO (`task: grpo`)."""
