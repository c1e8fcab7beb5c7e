"""Prefect flows; `train_and_eval` holds the `train-and-eval` flow."""
