"""Inference: MONAI bundles run in batches over the tensor store (issue #6)."""
