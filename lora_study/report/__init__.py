"""Stage findings: the report page, the chart style, captions, and experiment tracking."""
