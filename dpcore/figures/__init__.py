"""Every plotly chart of the app."""
