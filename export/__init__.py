"""admrt.export."""
