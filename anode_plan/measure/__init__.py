"""Measure: every stage's bytes and cost, on fake tensors and then on the device, as the planners' chain."""
