"""The public query API (/api/v1): auth, periods, stats and affiliate queries over the tables."""
