"""Commitments (tensor and state roots, proofs) and the provider node."""
