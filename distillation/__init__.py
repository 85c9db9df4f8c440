"""Recovering a factorized student by imitating its teacher: the losses and the training loop."""
