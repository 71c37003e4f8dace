"""Adapter to AUTOMATIC1111: the only package that imports ``modules.*`` (and only inside functions)."""
