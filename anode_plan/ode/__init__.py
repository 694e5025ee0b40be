"""The ODE block and the solvers: fixed-step tableaus, and the adaptive ``odeint`` with online checkpointing."""
