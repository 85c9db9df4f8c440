"""Recovering a factorized student by imitating its teacher: the losses, the training loop, and the
teacher's own translations as training targets (sequence-level distillation)."""
