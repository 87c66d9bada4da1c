"""token-broker: keeps OAuth 2.0 grants fresh and hands access tokens to local services."""

__version__ = "0.1.0"
