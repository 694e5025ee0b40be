"""Plan: a schedule chosen for a budget on a measured chain, the checks it must pass, and plan files."""
