"""The training job (background thread, events, commands), the shared loop, diffusion and LLM trainers."""
