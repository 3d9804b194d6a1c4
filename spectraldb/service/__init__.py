"""`specdb serve`: the read-only HTTP service.

- `app`: the endpoints (one per verb, runs, spectra, SQL) and the error translation;
- `cache`: answers remembered until the store file changes;
- `guard`: Host, token, turns, security headers, path scrubbing;
- `assets`: the dashboard and the scripts it loads, served locally.
"""

from spectraldb.service.app import create_app, records, sql_body

__all__ = ["create_app", "records", "sql_body"]
