"""What is computed from stored runs."""
