"""Inline-PTX wrappers with their CPU emulation. Shipped as package data."""
