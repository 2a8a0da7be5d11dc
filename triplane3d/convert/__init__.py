"""triplane3d.convert."""
