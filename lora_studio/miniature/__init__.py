"""Miniature models trained by the project itself, from scratch, on a CPU: they really draw and answer.

A procedural world (``world``: coloured shapes on plain backgrounds at 64 px, with captions; ``world_text``:
a made-up land of creatures, told as questions and answers) is what the miniatures were trained on, by
the deterministic build scripts (``build``: ``python -m lora_studio.miniature.build FAMILY --out DIR``).
Their weights are committed in ``weights/`` and written out by ``store.write_miniature`` (the CLI's
``python -m lora_studio miniature FAMILY --out DIR``). ``measure`` reads a picture of the world (its
dominant colour, its share of the concept's pink): the demo and the proof-of-learning tests use them.
"""
