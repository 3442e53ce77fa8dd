"""The statistics every comparison is judged with: paired verdicts with intervals, their calibration, replicates."""
