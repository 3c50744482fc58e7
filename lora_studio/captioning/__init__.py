"""Captioners (BLIP captions, CLIP style tags) behind one interface, and batch caption edits."""
