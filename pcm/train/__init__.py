"""Distillation: one training step (step.py), keyed randomness, EMA target, the loop."""
