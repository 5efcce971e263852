"""Training programs: ``python -m train.ldm`` (default: latent diffusion on the bundled digits), ``train.vae``."""
