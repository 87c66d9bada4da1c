"""`make demo`: the broker against a real local identity provider, end to end."""
