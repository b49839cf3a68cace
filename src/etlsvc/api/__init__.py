"""API: the HTTP application (read API, change feed, run control, logs) on the same loop."""
