"""Document-stream data."""
