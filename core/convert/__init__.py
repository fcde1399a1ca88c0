"""Checkpoint conversion (`gigatron convert`). Nothing here is imported by training."""
