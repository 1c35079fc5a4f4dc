"""dpcore: the DP Explorer engine (data, accounting, DP-SGD training, run store). No UI code here."""

__version__ = "0.1.0"
