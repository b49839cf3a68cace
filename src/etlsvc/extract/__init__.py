"""Extract: where records come from. One module per kind of source (see ``contract.py``)."""
