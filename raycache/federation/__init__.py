"""Federated rounds: pure aggregation and sampling maths, and the Ray actors that run them."""
