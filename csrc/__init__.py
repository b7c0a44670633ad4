"""Kernel sources (device code, split by role). Shipped as package data."""
