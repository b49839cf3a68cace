"""Load: raw rows by COPY, rejects, and checkpoints, each batch in one transaction."""
