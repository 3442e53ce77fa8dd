"""Stage prepare: the base model (from a local folder, the hub or a PyPI package) and the instruction data set."""
