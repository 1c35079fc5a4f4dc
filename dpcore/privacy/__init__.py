"""The privacy mechanism's own parts: secret randomness, image identity, lineage, group privacy.

Nothing here imports the trainer, the app or streamlit, so each part can be reviewed on its own.
"""
