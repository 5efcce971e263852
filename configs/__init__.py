"""ml_collections config files for ``train.*``: ``--config configs/ldm_digits.py --config.train.steps=500``."""
