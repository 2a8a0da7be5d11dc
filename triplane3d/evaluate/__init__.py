"""triplane3d.evaluate."""
