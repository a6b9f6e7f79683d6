"""What no idea touches: the machinery beside experiment.py.

experiment.py is what an idea edits (config, data, model, schedule and control, the built-in agents, the
training run, sampling, results, CLI). This package holds the rest, one concern per module. Imports go one
way: entry points -> experiment.py -> harness; nothing here imports experiment.py or an entry point.
"""
