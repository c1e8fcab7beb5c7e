"""Prefect tasks: thin wrappers that call the arcface stage functions in-process."""
