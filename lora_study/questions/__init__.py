"""The report's questions: each one's table, sentences with verdicts, chart and caption."""
