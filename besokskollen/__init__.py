"""Besökskollen: composition of ingest, streams and query_api, configuration and the CLI."""
