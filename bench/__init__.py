"""Benchmarks: numbers to report, not pass/fail tests (docs/performance.md has the results).

One module per benchmark, each `python -m bench.NAME [--smoke] [--json FILE]` printing tables:
`serving` (h2load against the daemon and a bare aiohttp handler), `rotation` (every grant due
at once against `fake_idp`, beside `commit_rate`), `bulk_import` and `scale`; `python -m bench`
runs them all. The rest is their shared tooling: `install` (a broker installation and its
daemon), `seed` (many grants straight into the store), `h2load`, `identity` (who the client
runs as), `servers` (helper processes), `pg`, `proc` and `machine` (what was measured where),
`report` (tables and JSON), `tokens` (fake token values and the leak check), `options`.
"""
