"""Policies (where tensors live, how the batch is cut), hardware profiles, cost model, optimizer."""
