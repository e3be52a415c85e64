"""The trainguard daemon. Never imports torch."""
