"""Transform: validation of records (Python) and their normalization (SQL)."""
