"""python -m dpcore: one module per command group."""
