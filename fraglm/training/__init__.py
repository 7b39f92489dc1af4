"""The training loop and what it is built from: data, model, optimizer, schedule,
evaluation, resume state and metrics.
"""
