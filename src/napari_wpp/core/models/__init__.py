"""Trainable models (WPPNet, WPPFlow)."""
