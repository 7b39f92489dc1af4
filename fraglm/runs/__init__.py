"""Run directories: their layout, checkpoints written and verified, resume policy, and
loading a trained run.
"""
