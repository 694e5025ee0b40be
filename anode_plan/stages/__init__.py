"""Ways to run one stage beside running it as written: rebuilt by inverse steps, sketched (XConv), compiled."""
