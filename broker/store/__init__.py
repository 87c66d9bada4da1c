"""Persistence: the schema, the engine with its pragmas, and the repository (the only SQL)."""
