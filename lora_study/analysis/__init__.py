"""Stage aggregate: every run's measurements in one table."""
