"""triplane3d."""
