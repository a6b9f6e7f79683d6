"""The Q-learning agent can learn, and a divergence is always its worst outcome.

The synthetic task stands in for training: eight decisions per episode, each action lowers the val loss
by a known amount, one action (x1.25, not the neutral x1) lowers it most. The table is carried from
episode to episode the way --agent_init carries it from run to run.
"""
import json
import math

import numpy as np
import pytest

import experiment as ex
from conftest import run_cli

ACTIONS = "0.5,0.8,1,1.25,2"
BEST = 3          # x1.25
DECISIONS = 8     # evaluations with a decision per episode (as the cpu profile has)
INTERVAL = 250


def qcfg(**kw):
    base = dict(agent="qlearning", agent_actions=ACTIONS, epsilon=0.1, agent_lr=0.1, gamma=0.9)
    return ex.Config(**{**base, **kw})


def gain(action: int, rng) -> float:
    """Loss drop of one interval: the best action gains 0.03 more than the others, plus noise."""
    return (0.06 if action == BEST else 0.03) + rng.normal(0, 0.005)


def play_episode(agent, rng, start_loss=2.5, diverging_action=None):
    """One synthetic training run driven by `agent`; returns its decision records."""
    loss, records = start_loss, []
    max_iters = DECISIONS * INTERVAL
    for k in range(DECISIONS + 1):
        record = agent.observe(ex.Observation(k * INTERVAL, max_iters, loss, loss))
        records.append(record)
        if record["action"] is None:
            break
        if record["action"] == diverging_action:  # the interval blows up: rolled back, training goes on
            agent.on_rollback(ex.divergence_loss(agent.cfg, 2.5), (k + 1) * INTERVAL)
            continue
        loss -= gain(record["action"], rng)
    return records


def train(cfg, episodes, seed=0, **kw):
    """Episodes in a row, each a fresh agent inheriting the previous one's table (as --agent_init does)."""
    rng, state, history = np.random.default_rng(seed), None, []
    for episode in range(episodes):
        agent = ex.QLearningAgent(cfg, seed=1000 * seed + episode)
        if state is not None:
            agent.inherit([state])
        history.append(play_episode(agent, rng, **kw))
        state = agent.state_dict()
    return agent, history


def greedy_choices(history):
    return [r["action"] for episode in history for r in episode if r["action"] is not None and not r["explored"]]


# Budget in episodes of 8 decisions: 300 (2,400 decisions) for the per-interval rewards; -L_t carries the
# whole history of the run (every earlier decision moved it), so its credit is noisier and it needs 600.
@pytest.mark.parametrize("reward, episodes", [("neg_val_loss", 600), ("improvement", 300),
                                              ("log_improvement", 300)])
def test_agent_learns_the_best_action_of_a_synthetic_task(reward, episodes):
    _, history = train(qcfg(reward=reward), episodes=episodes + 20)
    greedy = greedy_choices(history[episodes:])  # the 20 episodes after the budget
    assert len(greedy) >= 100
    assert np.mean(np.array(greedy) == BEST) >= 0.9


def test_untrained_greedy_choice_is_the_neutral_action():
    agent = ex.QLearningAgent(qcfg(epsilon=0.0), seed=0)
    record = agent.observe(ex.Observation(0, 2000, 4.0, 4.0))
    assert ex.parse_actions(ACTIONS)[record["action"]] == 1.0 and record["explored"] is False


def test_epsilon_changes_which_actions_are_taken():
    runs = {}
    for epsilon in (0.1, 0.5):
        agent = ex.QLearningAgent(qcfg(epsilon=epsilon), seed=7)
        runs[epsilon] = [r["action"] for r in play_episode(agent, np.random.default_rng(0))]
    assert runs[0.1] != runs[0.5]


def test_frozen_agent_is_greedy_and_learns_nothing():
    trained, _ = train(qcfg(), episodes=30)
    frozen = ex.QLearningAgent(qcfg(epsilon=1.0, agent_freeze=True), seed=3)
    frozen.inherit([trained.state_dict()])
    q, baseline = frozen.q.copy(), json.dumps(frozen.baseline)
    records = play_episode(frozen, np.random.default_rng(1))
    assert all(r["explored"] is False and r["epsilon"] == 0.0 for r in records if r["action"] is not None)
    assert np.array_equal(frozen.q, q) and json.dumps(frozen.baseline) == baseline


def test_agent_init_pools_every_seed_and_continues_exploration():
    first = ex.QLearningAgent(qcfg(epsilon_decay=0.5, epsilon_min=0.02), seed=0)
    second = ex.QLearningAgent(qcfg(epsilon_decay=0.5, epsilon_min=0.02), seed=1)
    play_episode(first, np.random.default_rng(0))
    play_episode(second, np.random.default_rng(1))
    a, b = first.state_dict(), second.state_dict()
    heir = ex.QLearningAgent(qcfg(), seed=2)
    heir.inherit([a, b])
    va, vb = np.array(a["visits"]), np.array(b["visits"])
    qa, qb = np.array(a["q"]), np.array(b["q"])
    both = (va > 0) & (vb > 0)
    assert both.any() and np.array_equal(heir.visits, va + vb)
    assert np.allclose(heir.q[both], (qa * va + qb * vb)[both] / (va + vb)[both])
    assert heir.epsilon == pytest.approx(min(a["epsilon"], b["epsilon"])) and heir.epsilon < 0.1


# ---------------------------------------------------------------- divergence


@pytest.mark.parametrize("reward", ["neg_val_loss", "improvement", "log_improvement"])
def test_a_divergence_scores_below_every_interval_that_did_not_diverge(reward):
    """Computed example: the advantage a rollback teaches is below the advantage of any loss under the
    divergence threshold, at every decision of a realistic run, under every reward option."""
    agent, _ = train(qcfg(reward=reward), episodes=20)
    threshold = ex.divergence_loss(agent.cfg, 2.5)
    for k in range(DECISIONS):
        prev = 2.5 - 0.05 * k
        it = (k + 1) * INTERVAL
        usual = agent.baseline[str(it)][0]
        # The worst interval that did not diverge ends just under the threshold.
        worst_ok = ex.reward_for(reward, prev, threshold * 0.999) - usual
        diverged = ex.reward_for(reward, prev, threshold) + agent.cfg.divergence_penalty - usual
        assert diverged < worst_ok < 0


def test_a_rollback_is_a_non_terminal_transition_to_the_restored_state():
    cfg = qcfg(epsilon=0.0, agent_lr=0.5, gamma=0.9)
    agent = ex.QLearningAgent(cfg, seed=0)
    agent.observe(ex.Observation(0, 2000, 2.5, 2.5))
    state, action = agent.prev_state, agent.prev_action
    restored = (state[0], agent.multiplier_bucket(agent.multiplier * cfg.rollback_cut), state[2])
    agent.q[restored] = [0.0, 0.0, 0.4, 0.0, 0.0]  # the value of going on from the restored state
    agent.on_rollback(5.0, 250)
    reward = -5.0 + cfg.divergence_penalty - (-2.5)  # against "changed nothing": no baseline at 250 yet
    # Not terminal: the target bootstraps from the restored state; a first visit takes the whole target.
    assert agent.q[state + (action,)] == pytest.approx(reward + 0.9 * 0.4)
    assert agent.prev_action is None  # the forced cut gets no second, ordinary update at the next evaluation


@pytest.mark.parametrize("reward", ["neg_val_loss", "improvement", "log_improvement"])
def test_a_trained_agent_never_prefers_the_action_that_diverges(reward):
    agent, history = train(qcfg(reward=reward), episodes=60, diverging_action=4)  # x2 always diverges
    visited = agent.visits.sum(axis=-1) > 0
    assert (agent.q[visited].argmax(axis=-1) != 4).all()
    assert 4 not in greedy_choices(history[40:])


# ---------------------------------------------------------------- through the command line


def smoke(out_dir, data_dir, *extra, env=None):
    args = ["--out_dir", out_dir, "--profile", "smoke", "--data_dir", data_dir, "--datasets", "shakespeare_char",
            "--inference_samples", "0", "--notes", "off", *extra]
    proc = run_cli(args, env_extra=env)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out_dir / "all_results.json").read_text())
    return results["shakespeare_char_0_val_info"], results["shakespeare_char_0_train_info"], proc


def actions_of(val_info):
    return [(r["action"], r["explored"]) for r in val_info]


def test_epsilon_changes_a_run_and_a_frozen_table_acts_greedily(prepared_data_dir, tmp_path):
    runs = {e: smoke(tmp_path / f"eps{e}", prepared_data_dir, "--agent", "qlearning", "--epsilon", e)[0]
            for e in ("0.5", "0.1")}
    assert actions_of(runs["0.5"]) != actions_of(runs["0.1"])
    frozen = {e: smoke(tmp_path / f"frozen{e}", prepared_data_dir, "--agent", "qlearning", "--epsilon", e,
                       "--agent_init", tmp_path / "eps0.5", "--agent_freeze")[0] for e in ("0.5", "0.1")}
    assert actions_of(frozen["0.5"]) == actions_of(frozen["0.1"])
    assert all(r["explored"] is False and r["epsilon"] == 0.0 for r in frozen["0.5"] if r["action"] is not None)


def cosine(it, lr=1e-3, min_lr=1e-4, warmup=5, decay=30):
    """The smoke profile's base schedule, written out independently of the harness."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    return min_lr + 0.5 * (1 + math.cos(math.pi * (it - warmup) / (decay - warmup))) * (lr - min_lr)


def test_a_fault_at_an_evaluation_iteration_is_undone_by_one_rollback(prepared_data_dir, tmp_path):
    # Evaluations at 0, 10, 20, 30. The fault sits in the weights entering step 10, which the checkpoint
    # saved at iteration 10 holds: the rollback must go back to iteration 0 and change what follows.
    val_info, _, proc = smoke(tmp_path / "run", prepared_data_dir, "--agent", "qlearning",
                              env={"GPT_RL_TEST_NAN_AT": "10"})
    info = json.loads((tmp_path / "run" / "final_info.json").read_text())["shakespeare_char"]
    assert info["statuses"] == ["finished"] and info["final_info_dict"]["rollbacks"] == [1]
    assert "rollback 1/3 to iter 0" in proc.stderr


def test_after_a_rollback_every_record_says_what_the_optimizer_used(prepared_data_dir, tmp_path):
    # Fault at step 12: back to the checkpoint of iteration 10, whose decision is blamed and cut.
    out = tmp_path / "run"
    val_info, train_info, _ = smoke(out, prepared_data_dir, "--agent", "qlearning", "--epsilon", "0",
                                    env={"GPT_RL_TEST_NAN_AT": "12"})
    actions = ex.parse_actions(ACTIONS)
    first, blamed = val_info[0], val_info[1]
    assert blamed["iter"] == 10 and blamed["rollbacks"] == 1
    chosen = min(max(first["multiplier"] * actions[blamed["action"]], 0.125), 8.0)
    assert blamed["multiplier"] == pytest.approx(chosen * 0.5)  # the cut is in the record
    used = {r["iter"]: r["lr"] for r in train_info}
    for it in (10, 15):  # the optimizer's rate between the decision at 10 and the next one at 20
        assert used[it] == pytest.approx(cosine(it) * blamed["multiplier"])
    assert blamed["lr"] == pytest.approx(used[10])
    agent = json.loads((out / "agent_shakespeare_char_0.json").read_text())
    assert agent["trajectory"][1]["multiplier"] == blamed["multiplier"]
    # The penalty went to the blamed (state, action) and to nothing else; it got no second update.
    q, visits = np.array(agent["q"]), np.array(agent["visits"])
    penalised = tuple(blamed["state"]) + (blamed["action"],)
    assert visits[penalised] == 1 and q[penalised] < -4
    others = [tuple(r["state"]) + (r["action"],) for r in val_info if r["action"] is not None and r is not blamed]
    assert all(q[sa] > -1 for sa in others if sa != penalised)
    # --agent replay plays back the multipliers that were used: the same rates at every logged step.
    _, replay_train, _ = smoke(tmp_path / "replay", prepared_data_dir, "--agent", "replay", "--agent_init", out)
    assert [r["lr"] for r in replay_train] == [r["lr"] for r in train_info]


def test_agent_init_from_a_run_without_a_q_table_is_one_line(prepared_data_dir, tmp_path):
    smoke(tmp_path / "random", prepared_data_dir, "--agent", "random")
    proc = run_cli(["--out_dir", tmp_path / "q", "--profile", "smoke", "--data_dir", prepared_data_dir,
                    "--datasets", "shakespeare_char", "--agent", "qlearning", "--agent_init", tmp_path / "random"])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "holds no Q-table (it was saved by agent 'random')" in proc.stderr
