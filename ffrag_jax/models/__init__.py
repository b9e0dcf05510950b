"""Model definitions (pure Flax modules with a functional entry point)."""
