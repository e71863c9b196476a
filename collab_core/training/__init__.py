"""Training for Collaborative Diffusion: synthetic data, uni-modal LDMs and VAE, dynamic diffusers, the demo bundle.

Importing this package is cheap; the trainers import ``accelerate`` when they run.
"""
