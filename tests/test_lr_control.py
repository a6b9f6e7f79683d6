"""Learning-rate control acts on the optimizer: schedules, the multiplier pipeline, the agents."""
import json
import math

import numpy as np
import pytest
import torch

import experiment as ex


# The base schedule every run below trains on, given as flags; the expected learning rates are computed from
# these numbers by the test's own formula, never by the harness's base_lr/controlled_lr.
LR, MIN_LR, WARMUP, DECAY, MAX_ITERS, EVAL = 1e-3, 1e-4, 5, 30, 40, 5


def run(tmp_path, data_dir, name, *extra):
    """A smoke run on shakespeare_char, in-process; returns (val_info, train_info, run folder)."""
    out = tmp_path / name
    args = ["--out_dir", out, "--profile", "smoke", "--data_dir", data_dir, "--datasets", "shakespeare_char",
            "--schedule", "cosine", "--learning_rate", LR, "--min_lr", MIN_LR, "--warmup_iters", WARMUP,
            "--lr_decay_iters", DECAY, "--max_iters", MAX_ITERS, "--eval_interval", EVAL,
            "--inference_samples", "0", *extra]
    assert ex.main([str(a) for a in args]) == 0
    results = np.load(out / "all_results.npy", allow_pickle=True).item()
    return results["shakespeare_char_0_val_info"], results["shakespeare_char_0_train_info"], out


def losses(val_info):
    return [(r["train/loss"], r["val/loss"]) for r in val_info]


def cosine_with_warmup(it):
    """nanoGPT's schedule, written out: linear warmup from above 0, cosine decay to MIN_LR, then MIN_LR."""
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    if it >= DECAY:
        return MIN_LR
    progress = (it - WARMUP) / (DECAY - WARMUP)
    return MIN_LR + 0.5 * (1 + math.cos(math.pi * progress)) * (LR - MIN_LR)


def in_force(trajectory, it):
    """The multiplier in force at step `it`: the agent's decision at the last evaluation at or before it."""
    return [d["multiplier"] for d in trajectory if d["iter"] <= it][-1]


def agent_trajectory(out):
    return json.loads((out / "agent_shakespeare_char_0.json").read_text())["trajectory"]


@pytest.fixture
def optimizer_lrs(monkeypatch):
    """Records, for every AdamW step taken anywhere, the learning rate each param group held for it."""
    steps = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *a, **k):
        steps.append([float(g["lr"]) for g in self.param_groups])
        return real_step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    return steps


# --- the baseline is untouched ---

def test_agent_none_equals_the_plain_schedule_bit_for_bit(prepared_data_dir, tmp_path, optimizer_lrs):
    run(tmp_path, prepared_data_dir, "none", "--agent", "none")
    assert optimizer_lrs == [[cosine_with_warmup(it)] * 2 for it in range(MAX_ITERS)]  # both param groups, exactly


def test_a_neutral_agent_leaves_the_run_unchanged(prepared_data_dir, tmp_path):
    none, _, _ = run(tmp_path, prepared_data_dir, "none", "--agent", "none")
    neutral, _, _ = run(tmp_path, prepared_data_dir, "neutral", "--agent", "random", "--agent_actions", "1")
    assert losses(none) == losses(neutral)


# --- the agent's multiplier reaches the optimizer ---

def test_forced_doubling_reaches_every_param_group(prepared_data_dir, tmp_path, optimizer_lrs):
    baseline, _, _ = run(tmp_path, prepared_data_dir, "base", "--agent", "none")
    optimizer_lrs.clear()
    doubled, doubled_train, out = run(tmp_path, prepared_data_dir, "double", "--agent", "random",
                                      "--agent_actions", "2")

    def multiplier(it):  # x2 at every evaluation (iter 0, EVAL, ...) from 1, capped at multiplier_max 8
        return min(2.0 ** (it // EVAL + 1), 8.0)
    assert [r["multiplier"] for r in doubled] == [multiplier(r["iter"]) for r in doubled]
    assert len(optimizer_lrs) == MAX_ITERS
    for it, group_lrs in enumerate(optimizer_lrs):
        assert group_lrs == [pytest.approx(cosine_with_warmup(it) * multiplier(it), rel=1e-12)] * 2, it
    for record in doubled[:-1]:  # the logged lr is what the optimizer used at that step
        assert record["lr"] == optimizer_lrs[record["iter"]][0]
    for record in doubled_train:  # the per-step log carries the LR that step used
        assert record["lr"] == optimizer_lrs[record["iter"]][0]
    assert losses(doubled)[1:] != losses(baseline)[1:]


def test_multiplier_and_lr_never_leave_their_bounds(prepared_data_dir, tmp_path, optimizer_lrs):
    floor, ceiling = 2e-4, 3e-3
    val_info, _, out = run(tmp_path, prepared_data_dir, "wild", "--agent", "random", "--agent_actions", "0.01,100",
                           "--lr_floor", floor, "--lr_ceiling", ceiling, "--eval_interval", "1")
    trajectory = agent_trajectory(out)
    assert {d["multiplier"] for d in trajectory} == {0.125, 8.0}  # both bounds were hit, none passed
    assert len(optimizer_lrs) == MAX_ITERS
    for it, group_lrs in enumerate(optimizer_lrs):
        unclamped = cosine_with_warmup(it) * in_force(trajectory, it)
        assert group_lrs == [pytest.approx(min(max(unclamped, floor), ceiling), rel=1e-12)] * 2, it
    flat = [lr for group_lrs in optimizer_lrs for lr in group_lrs]
    assert min(flat) == floor and max(flat) == ceiling  # both clamps were needed, and held exactly


def test_random_agent_multiplier_stays_in_bounds_over_many_decisions():
    cfg = ex.Config(agent="random", agent_actions="0.3,3", multiplier_min=0.25, multiplier_max=4.0)
    agent = ex.RandomAgent(cfg, seed=0)
    seen = set()
    for it in range(2000):
        agent.observe(ex.Observation(it, 2000, 2.0, 2.0))
        assert 0.25 <= agent.multiplier <= 4.0
        seen.add(agent.multiplier)
    assert {0.25, 4.0} <= seen


# --- Q-learning ---

def qcfg(**kw):
    base = dict(agent="qlearning", agent_actions="0.5,1,2", epsilon=0.0, agent_lr=0.5, gamma=0.9)
    return ex.Config(**{**base, **kw})


def test_q_update_matches_a_hand_computed_td_step():
    agent = ex.QLearningAgent(qcfg(), seed=0)
    agent.observe(ex.Observation(it=0, max_iters=90, train_loss=3.0, val_loss=3.0))
    s0, a0 = agent.prev_state, agent.prev_action
    assert s0 == (0, 1, 0)  # no trend yet, multiplier around 1, first third
    # Give the next state known values so the bootstrap term is non-trivial, and the entry some history.
    s1 = (4, agent.multiplier_bucket(agent.multiplier), 1)  # val improves by >1%, now in the middle third
    agent.q[s1] = [0.2, -0.4, 1.0]
    agent.q[s0 + (a0,)], agent.visits[s0 + (a0,)] = 0.3, 5
    agent.baseline["30"] = [-2.6, 4]  # the usual reward at iteration 30
    agent.observe(ex.Observation(it=30, max_iters=90, train_loss=2.5, val_loss=2.5))
    assert agent.prev_state == s1
    advantage = -2.5 - (-2.6)  # the reward against its usual value there
    expected = 0.3 + 0.5 * (advantage + 0.9 * 1.0 - 0.3)  # Q += alpha (A + gamma max Q(s') - Q)
    assert agent.q[s0 + (a0,)] == pytest.approx(expected)
    assert agent.visits[s0 + (a0,)] == 6
    assert agent.baseline["30"] == [pytest.approx(-2.6 + 0.5 * 0.1), 5]  # the usual reward follows


def test_improvement_reward_and_terminal_update():
    agent = ex.QLearningAgent(qcfg(reward="improvement"), seed=0)
    log0 = agent.observe(ex.Observation(0, 20, 3.0, 3.0))
    assert log0["reward"] is None  # nothing to improve on yet
    s0, a0 = agent.prev_state, agent.prev_action
    agent.baseline["20"] = [0.04, 10]
    log1 = agent.observe(ex.Observation(20, 20, 2.9, 2.9))  # last evaluation: terminal, no action
    assert log1["reward"] == pytest.approx(0.1) and log1["action"] is None
    assert log1["advantage"] == pytest.approx(0.06)
    assert agent.q[s0 + (a0,)] == pytest.approx(0.06)  # first visit takes the whole target; no bootstrap


def test_epsilon_decays_to_its_floor():
    agent = ex.QLearningAgent(qcfg(epsilon=0.8, epsilon_decay=0.5, epsilon_min=0.15), seed=0)
    logged = [agent.observe(ex.Observation(it, 100, 2.0, 2.0))["epsilon"] for it in range(6)]
    assert logged == pytest.approx([0.8, 0.4, 0.2, 0.15, 0.15, 0.15])


def test_greedy_agent_picks_the_best_action():
    agent = ex.QLearningAgent(qcfg(), seed=0)
    agent.q[(0, 1, 0)] = [0.0, -1.0, 5.0]
    assert agent.observe(ex.Observation(0, 100, 2.0, 2.0))["action"] == 2
    assert agent.multiplier == 2.0


def test_agent_state_round_trips_exactly():
    cfg = qcfg(epsilon=0.5, epsilon_decay=0.9)
    agent = ex.QLearningAgent(cfg, seed=3)
    for it in range(0, 50, 5):
        agent.observe(ex.Observation(it, 100, 2.0, 2.0 - it / 100))
    saved = json.loads(json.dumps(agent.state_dict()))
    clone = ex.QLearningAgent(cfg, seed=999)
    clone.load_state_dict(saved)
    assert clone.state_dict() == agent.state_dict()
    later = [ex.Observation(it, 100, 1.5, 1.5 - it / 1000) for it in range(50, 100, 5)]
    assert [agent.observe(o) for o in later] == [clone.observe(o) for o in later]  # same RNG, same table


def test_frozen_agent_never_changes_its_table():
    agent = ex.QLearningAgent(qcfg(agent_freeze=True, epsilon=0.3), seed=0)
    agent.q[...] = np.random.default_rng(1).normal(size=agent.q.shape)
    before_q, before_visits = agent.q.copy(), agent.visits.copy()
    for it in range(0, 100, 5):
        agent.observe(ex.Observation(it, 100, 2.0, 2.0 - it / 200))
    assert np.array_equal(agent.q, before_q) and np.array_equal(agent.visits, before_visits)


def test_qlearning_run_revisits_states_and_saves_its_agent(prepared_data_dir, tmp_path):
    val_info, _, out = run(tmp_path, prepared_data_dir, "q", "--agent", "qlearning", "--eval_interval", "2")
    states = [tuple(r["state"]) for r in val_info]
    assert len(set(states)) < len(states)  # a state recurs within one run
    saved = json.loads((out / "agent_shakespeare_char_0.json").read_text())
    visits = np.array(saved["visits"])
    assert visits.sum() == len(val_info) - 1 and visits.sum(axis=-1).max() > 1
    assert [t["multiplier"] for t in saved["trajectory"]] == [r["multiplier"] for r in val_info]
    assert all(r["reward"] == -r["val/loss"] for r in val_info)


def test_agent_init_carries_the_table_into_a_frozen_run(prepared_data_dir, tmp_path):
    _, _, first = run(tmp_path, prepared_data_dir, "learn", "--agent", "qlearning", "--epsilon", "0.5")
    learned = json.loads((first / "agent_shakespeare_char_0.json").read_text())
    _, _, second = run(tmp_path, prepared_data_dir, "frozen", "--agent", "qlearning", "--agent_init", first,
                       "--agent_freeze", "--epsilon", "0")
    frozen = json.loads((second / "agent_shakespeare_char_0.json").read_text())
    assert frozen["q"] == learned["q"] and frozen["visits"] == learned["visits"]
    _, _, third = run(tmp_path, prepared_data_dir, "continue", "--agent", "qlearning", "--agent_init",
                      first / "agent_shakespeare_char_0.json")
    continued = json.loads((third / "agent_shakespeare_char_0.json").read_text())
    assert np.array(continued["visits"]).sum() == 2 * np.array(learned["visits"]).sum()  # it kept learning


def test_replay_reproduces_the_lr_trajectory(prepared_data_dir, tmp_path, optimizer_lrs):
    original, original_train, first = run(tmp_path, prepared_data_dir, "orig", "--agent", "random",
                                          "--agent_actions", "0.5,1,2")
    original_steps = list(optimizer_lrs)
    optimizer_lrs.clear()
    replayed, replayed_train, _ = run(tmp_path, prepared_data_dir, "replay", "--agent", "replay",
                                      "--agent_init", first)
    recorded = agent_trajectory(first)
    assert len({d["multiplier"] for d in recorded}) > 1  # something to replay
    assert len(optimizer_lrs) == MAX_ITERS
    for it, group_lrs in enumerate(optimizer_lrs):  # the recorded multipliers, on the base schedule, step by step
        assert group_lrs == [pytest.approx(cosine_with_warmup(it) * in_force(recorded, it), rel=1e-12)] * 2, it
    assert optimizer_lrs == original_steps
    assert [r["lr"] for r in replayed] == [r["lr"] for r in original]
    assert losses(replayed) == losses(original)
    assert [r["loss"] for r in replayed_train] == [r["loss"] for r in original_train]


# --- base schedules ---

def sched(**kw):
    base = dict(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=100, max_iters=100)
    return ex.Config(**{**base, **kw})


def test_constant_schedule():
    cfg = sched(schedule="constant")
    assert {ex.base_lr(cfg, it) for it in (0, 5, 50, 100)} == {1e-3}


def test_step_schedule_boundaries():
    cfg = sched(schedule="step", step_interval=30, step_gamma=0.1)
    assert ex.base_lr(cfg, 0) == pytest.approx(1e-3 / 11) and ex.base_lr(cfg, 0) > 0
    assert ex.base_lr(cfg, 10) == ex.base_lr(cfg, 39) == pytest.approx(1e-3)
    assert ex.base_lr(cfg, 40) == pytest.approx(1e-4) and ex.base_lr(cfg, 69) == pytest.approx(1e-4)
    assert ex.base_lr(cfg, 70) == pytest.approx(1e-5)


def test_step_interval_from_epochs():
    data = ex.CharDataset("x", {"train": np.zeros(10_000, np.uint16)}, ["a"], {})
    cfg = ex.with_step_interval_from_epochs(sched(step_epochs=2.0, batch_size=10, block_size=10), data)
    assert cfg.step_interval == 200  # 2 epochs x 10,000 tokens / 100 tokens per step


def test_wsd_schedule_boundaries():
    cfg = sched(schedule="wsd", wsd_decay_frac=0.2)
    assert ex.base_lr(cfg, 0) == pytest.approx(1e-3 / 11)
    assert ex.base_lr(cfg, 10) == ex.base_lr(cfg, 79) == pytest.approx(1e-3)
    assert ex.base_lr(cfg, 80) == pytest.approx(1e-3)  # decay starts here
    assert ex.base_lr(cfg, 90) == pytest.approx(0.5 * (1e-3 + 1e-4))
    assert ex.base_lr(cfg, 100) == pytest.approx(1e-4)


def test_controlled_lr_clamps():
    cfg = sched(schedule="constant", lr_floor=5e-4, lr_ceiling=2e-3)
    assert ex.controlled_lr(cfg, 0, 8.0) == 2e-3
    assert ex.controlled_lr(cfg, 0, 0.125) == 5e-4
    assert ex.controlled_lr(cfg, 0, 1.5) == pytest.approx(1.5e-3)


# --- schedule-free AdamW ---

def test_schedulefree_evaluates_in_eval_mode(prepared_data_dir, tmp_path, monkeypatch):
    real_make = ex.GPT.make_optimizer

    def spying_make(self, cfg, device):
        opt = real_make(self, cfg, device)
        spying_make.opt = opt
        return opt
    monkeypatch.setattr(ex.GPT, "make_optimizer", spying_make)
    real_mode = ex.optimizer_mode
    optimizer_modes = []
    monkeypatch.setattr(ex, "optimizer_mode", lambda opt, training: (optimizer_modes.append(training),
                                                                      real_mode(opt, training)))
    val_info, _, _ = run(tmp_path, prepared_data_dir, "sf", "--optimizer", "schedulefree", "--schedule", "constant")
    assert val_info[-1]["val/loss"] < val_info[0]["val/loss"]
    # evaluation (False) and training (True) alternate, starting in training mode
    assert optimizer_modes[:3] == [True, False, True] and optimizer_modes.count(False) == len(val_info) + 1
    assert spying_make.opt.param_groups[0]["train_mode"] is False  # left in eval mode after sampling


def test_schedulefree_needs_the_constant_schedule(prepared_data_dir, tmp_path, capsys):
    code = ex.main(["--out_dir", str(tmp_path / "x"), "--profile", "smoke", "--data_dir", str(prepared_data_dir),
                    "--datasets", "shakespeare_char", "--optimizer", "schedulefree"])
    assert code == 2 and "--schedule constant" in capsys.readouterr().err


# --- the reference runs are flags alone ---

def test_per_dataset_flag_values():
    base, typed = ex.parse_args(["--learning_rate", "shakespeare_char=2e-3,enwik8=1e-3,text8=1e-3",
                                 "--agent", "qlearning"])
    assert ex.config_for_dataset(base, typed, "full", "shakespeare_char").learning_rate == 2e-3
    assert ex.config_for_dataset(base, typed, "full", "enwik8").learning_rate == 1e-3
    base, typed = ex.parse_args(["--learning_rate", "enwik8=1e-3"])
    assert ex.config_for_dataset(base, typed, "full", "shakespeare_char").learning_rate == 1e-3  # the profile's
    assert ex.config_for_dataset(base, typed, "cpu", "enwik8").learning_rate == 1e-3
