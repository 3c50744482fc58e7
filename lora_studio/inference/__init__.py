"""Generating with a LoRA: image grids at several strengths and checkpoints; LLM answers side by side."""
