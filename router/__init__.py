"""Query Router: the library the BentoML service wires together."""
