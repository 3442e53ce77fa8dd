"""Stages evaluate, anatomy, downstream and deploy: what is measured of each trained run."""
