"""Captioners (BLIP captions, CLIP style tags) behind one interface, and batch caption edits."""

# The default models (here, so the command line can name them without importing transformers).
DEFAULT_BLIP = "Salesforce/blip-image-captioning-base"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
