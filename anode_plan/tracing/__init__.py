"""Capture: the model traced on fake tensors of the example's shapes and cut into stages (one per ODE step)."""
