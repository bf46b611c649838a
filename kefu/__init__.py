"""kefu: a self-hosted, high-performance customer-service chat engine."""

from kefu._version import __version__

__all__ = ["__version__"]
