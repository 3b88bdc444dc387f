"""Modeling code shipped inside factored HF exports (copied next to the weights, ``auto_map``)."""
