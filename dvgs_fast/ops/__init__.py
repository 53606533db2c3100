"""Thin Python wrappers around torch.ops.dvgs_fast.*, with fake kernels and autograd."""
