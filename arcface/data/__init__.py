"""LFW download and protocols, face alignment, the aligned store and torch datasets."""
