"""Glue between GiVA and training loops (transformers Trainer, TRL, Accelerate)."""
