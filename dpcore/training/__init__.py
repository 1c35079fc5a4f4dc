"""The training loop and its recipe parts."""
