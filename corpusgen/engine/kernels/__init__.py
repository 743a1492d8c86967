"""Every Triton kernel, behind one import guard, each beside the PyTorch reference it is tested
against."""
