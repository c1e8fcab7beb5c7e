"""Backbones (by name, from a registry) and the normalized classifier head."""
