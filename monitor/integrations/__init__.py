"""Thin adapters from each framework's hooks to monitor.client; each imports its framework lazily."""
