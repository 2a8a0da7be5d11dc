"""Machines: Cloud TPU / GKE / SLURM launchers and the ahead-of-time fit check.

Installed as `triplane3d.launch` (pyproject maps this folder), so every launcher runs as
`python -m triplane3d.launch.<name>` from anywhere. Launchers own machines only: they build
commands and manifests and hand the config to `python -m triplane3d.main` unchanged.
"""
