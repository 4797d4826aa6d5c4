"""Inference: batched generation from a trained model."""
