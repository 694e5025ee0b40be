"""``anode_plan.compile``: trace, measure, plan, check, and the model that runs the plan."""
