"""Data ingestion: ParaRel templates x LAMA T-REx facts, and the Bing web sentences."""
