"""triplane3d.models."""
