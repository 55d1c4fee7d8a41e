"""Everything the gateway changes in a response: the plan, and the rewriters it picks."""
