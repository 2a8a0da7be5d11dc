"""triplane3d.data: TFDS/ArrayRecord sources, precomputed depth, joint transforms, the grain
pipeline and synthetic scenes with exact depth. Start at `pipeline.create`; see docs/data.md."""
