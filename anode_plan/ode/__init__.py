"""The ODE block and the solvers: fixed-step tableaus, and ``odeint`` (torchdiffeq's surface: adaptive and fixed-grid
methods, events, ``odeint_adjoint``) with checkpointing under a byte budget."""
