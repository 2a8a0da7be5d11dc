"""Experiment configs (installed as `triplane3d.configs`)."""
