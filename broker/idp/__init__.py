"""Talking to identity providers: discovery, authorize URLs, token calls, ID token checks."""
