"""triplane3d.data."""
