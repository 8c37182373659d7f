"""The web layer: parse, authorise, call the layer below, serialise."""
