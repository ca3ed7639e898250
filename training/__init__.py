"""admrt.training."""
