"""Scripts that print measured figures (run them as files: ``python benchmarks/NAME.py``).

``pi_benchmark.py`` is standalone (numpy + ai-edge-litert only) and is copied into every export's
device bundle; the others import the pipeline.
"""
