"""Debugging tools for a converted model: where in the graph int8 loses accuracy (:mod:`pipeline.debug.layers`)."""
