"""What no idea touches: the machinery beside experiment.py.

experiment.py is what an idea edits (config, data, the model in model.py beside it, schedule and control, the
built-in agents, the training run, sampling, results, CLI). This package holds the rest, one concern per module.
Imports go one way: entry points -> experiment.py (and model.py) -> harness; nothing here imports experiment.py,
model.py or an entry point, and a module that needs the config takes it as a plain object (duck typing).

  errors       UserError (exit 2), RunFailed (exit 1), Interrupted (exit 130)
  files        the one atomic writer (bytes, JSON, .npy, a set of files), read_json, sha256_file; no torch
  records      run.json: provenance, commit, environment, command line; the run folder's guard; resume checks
  run_folder   checkpoint names, the seeds a resume keeps, datasets loaded in torchrun's order (under a lock),
               run.json begun, the resumed run's device and backend, notes.txt and plots at the end
  validation   every config field against its declared bounds; torchrun checks; trained-policy and config
               warnings; the data fits the context; the agent and --control/--lr_groups refusals
  cli          one-line-error parsers, config flags, the main() wrappers of the entry points
  distributed  World: the torchrun processes and their collectives; a failure on one rank ending every rank
               (RankFailed, JobStore, FailureWatch); sharded loops a stop can end (EvaluationStopped)
  runtime      Runtime (device, dtype, compile), StopRequest, FaultInjector (NaN and raise test hooks), Progress
  checkpoints  CheckpointStore (the last two checkpoints) and RunCheckpoints (what one of a run holds)
  grad_stats   gradient statistics between evaluations, LAMB's per-layer trust
  policy_files policy folders read as data, never code: agent states, train_agent.py manifests, stable-baselines3
               zips loaded without unpickling, the dqn replay buffer as plain arrays
  control      --control's hyperparameters and bounds, the LR groups, action factors and their decoding,
               policy_inputs (what the config tells a policy network)
  agents       Agent (the multipliers, bounds, records and saved state under every agent); the neural agents:
               ReinforceAgent and SB3Agent (stable-baselines3 ppo/dqn deployed frozen)
  controllers  the reinforce learner (policy network, optimizer, return baseline, the update); tensors as JSON
  stats        mean and stderr, t intervals, paired and Welch differences, Holm: the project's one copy (no torch)
  tensorboard  live curves for --tensorboard (imported with the flag only)
  observation  the neural controllers' observation vector; PolicyInputs, what the config decides of it
  pbt_lineage  a PBT member's lineage through every exploit, written as a schedule --agent replay plays
"""
