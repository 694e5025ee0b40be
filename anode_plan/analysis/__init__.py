"""Looking at plans: reports, landmarks and trade-off curves, plots, and the largest batch for a budget."""
