"""The tiny video DiT trained on procedural videos, its data and its sampler."""
