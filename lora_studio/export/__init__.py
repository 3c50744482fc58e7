"""Writing LoRA files: kohya/A1111 with ss_* metadata, diffusers, PEFT; reload-and-compare checks."""
