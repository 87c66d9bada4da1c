"""The HTTP API: thin handlers, caller identity and policy, problem+json errors."""
