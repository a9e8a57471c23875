"""Vision attention: channel and spatial gating, non-local family, attention as convolution."""
