"""Solidity contracts, build and bindings."""
