"""The planner: policies (where each tensor lives), the memory model, the cost model over a
measured hardware profile, and the optimizer that picks a policy. Torch-free."""
