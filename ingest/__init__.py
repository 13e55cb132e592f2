"""Ingestion: the event wire contract, validation, enrichment and the hand-off to the stream core."""
