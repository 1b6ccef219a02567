"""Supervised warm-up (the base) and RL training (GRPO, Reinforce++)."""
