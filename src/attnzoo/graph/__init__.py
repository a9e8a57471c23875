"""Graph attention."""
