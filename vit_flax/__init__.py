"""vit_flax."""
