"""Evaluation: retrieval and rank metrics, the tiny-world model card, the noisy-latent fidelity benchmark."""
