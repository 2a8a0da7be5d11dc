"""Evaluation configs: `python -m triplane3d.evaluate --config=configs/eval/<suite>.py`."""
