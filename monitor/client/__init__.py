"""Runs inside training processes; never imports monitor.daemon."""

from monitor.client.reporter import Reporter

__all__ = ["Reporter"]
