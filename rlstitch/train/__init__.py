"""Training utilities and algorithms (checkpoints, DiffusionNFT, DRaFT)."""
