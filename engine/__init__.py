"""admrt.engine: the Engine API, its backends, and the C++ sampling core (_core)."""
