"""Models shipped with pmpo (data, no code): ``shapeworld-clip/``, the offline CLIP with its model
card, evaluation and trained prompts. Installed as ``pmpo.checkpoints`` (see ``pmpo/__init__.py``)."""
