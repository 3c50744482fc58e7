"""LoRA Studio: train LoRA adapters for Stable Diffusion 1.5, SDXL and causal language models.

The engine (everything in this package except ``ui``) never imports gradio; the app, the command line and
the tests call the same functions.
"""

__version__ = "0.1.0"
