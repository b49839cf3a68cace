"""etlsvc: pull CSV files, JSON APIs and feeds into PostgreSQL, normalize them, serve them."""

__version__ = "0.1.0"
