"""Specification of the study module (bench/study.py) and the statistics it shares (harness/stats.py)."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import study  # noqa: E402
from harness import stats  # noqa: E402

import experiment as ex  # noqa: E402
from harness.files import sha256_file  # noqa: E402

SMOKE = ["--profile", "smoke"]


# --- seed sets ---

def test_named_seed_sets_start_where_the_spec_says():
    assert study.seeds("held_out", 3) == [1337, 1338, 1339]
    assert study.seeds("search", 2) == [2000, 2001]
    assert study.seeds("training", 1) == [1_000_000]
    assert study.seeds("held_out", 2, offset=10) == [1347, 1348]


def test_overlapping_seed_sets_are_refused():
    study.check_disjoint(held_out=study.seeds("held_out", 10), search=study.seeds("search", 3),
                         training=study.seeds("training", 500))
    with pytest.raises(ex.UserError, match="held_out and search overlap"):
        study.check_disjoint(held_out=study.seeds("held_out", 700), search=study.seeds("search", 3))
    with pytest.raises(ex.UserError, match="overlap"):
        study.check_disjoint(a=[5, 6], b=[7], c=[6])


# --- the run cache ---

def policy_folder(path, policy_bytes: bytes):
    """A folder as train_agent.py leaves it: the manifest names the policy file."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps({"policy_file": "policy.json", "agent": "reinforce"}))
    (path / "policy.json").write_bytes(policy_bytes)
    return path


def test_run_folder_changes_with_any_config_field_seed_or_policy_bytes(tmp_path):
    agent = policy_folder(tmp_path / "agent", b'{"w": [1, 2]}')
    flags = [*SMOKE, "--agent", "reinforce", "--agent_init", agent]
    folder, key = study.run_folder(tmp_path, flags, "shakespeare_char", 1337)
    assert study.run_folder(tmp_path, flags, "shakespeare_char", 1337)[0] == folder  # deterministic
    assert key["config"]["seed_base"] == 1337 and key["config"]["n_layer"] == ex.PROFILES["smoke"]["*"]["n_layer"]
    assert key["policy_sha256"] == sha256_file(agent / "policy.json")
    assert study.run_folder(tmp_path, [*flags, "--weight_decay", "0.2"], "shakespeare_char", 1337)[0] != folder
    assert study.run_folder(tmp_path, flags, "shakespeare_char", 1338)[0] != folder
    # a setting equal to the profile's value resolves to the same config: the same folder
    assert study.run_folder(tmp_path, [*flags, "--n_layer", str(key["config"]["n_layer"])],
                            "shakespeare_char", 1337)[0] == folder
    # where the run writes and what it reports are not results
    assert study.run_folder(tmp_path, [*flags, "--title", "x"], "shakespeare_char", 1337)[0] == folder
    (agent / "policy.json").write_bytes(b'{"w": [1, 3]}')
    assert study.run_folder(tmp_path, flags, "shakespeare_char", 1337)[0] != folder


class FakeRuns:
    """Study.sh replaced by a stand-in that 'runs' experiment.py instantly: writes final_info.json."""

    def __init__(self):
        self.calls = []

    def __call__(self, script, *args, **how):
        args = list(map(str, args))
        out = ROOT / args[args.index("--out_dir") + 1]
        out.mkdir(parents=True, exist_ok=True)
        seed = int(args[args.index("--seed_base") + 1])
        (out / "final_info.json").write_text(json.dumps(
            {"shakespeare_char": {"final_info_dict": {"full_val_loss": [seed / 1000]}}}))
        self.calls.append(args)
        return 0.0


def test_cache_reuses_a_finished_matching_folder_and_reruns_on_any_change(tmp_path, monkeypatch):
    agent = policy_folder(tmp_path / "agent", b"first policy")
    s = study.Study(tmp_path / "study", SMOKE)
    fake = FakeRuns()
    monkeypatch.setattr(s, "sh", fake)
    arm = study.Arm("rl", ["--agent", "reinforce", "--agent_init", agent], seeds=[1337, 1338])
    s.run(arm)
    assert len(fake.calls) == 2 and arm.values == {1337: 1.337, 1338: 1.338}
    assert arm.run_steps == 2 * ex.PROFILES["smoke"]["*"]["max_iters"]
    s.run(arm)
    assert len(fake.calls) == 2  # both reused
    s.run(study.Arm("rl", [*arm.flags, "--max_iters", "31"], seeds=[1337]))
    assert len(fake.calls) == 3  # a changed setting runs again
    (agent / "policy.json").write_bytes(b"retrained policy")
    s.run(arm)
    assert len(fake.calls) == 5  # a changed policy runs every seed again
    s.run(arm)
    assert len(fake.calls) == 5


def test_a_folder_whose_key_does_not_match_is_run_again_not_reused(tmp_path, monkeypatch):
    s = study.Study(tmp_path / "study", SMOKE)
    fake = FakeRuns()
    monkeypatch.setattr(s, "sh", fake)
    folder, _ = s.run_seed([], 1337)
    (folder / study.KEY_FILE).write_text(json.dumps({"config": {"stale": True}, "policy_sha256": None}))
    assert s.run_seed([], 1337)[0] == folder and len(fake.calls) == 2
    assert "--overwrite" in fake.calls[-1]
    (folder / study.KEY_FILE).unlink()  # finished but never confirmed (killed before the key was written)
    s.run_seed([], 1337)
    assert len(fake.calls) == 3



def test_an_arms_seeds_run_side_by_side_with_their_own_logs_and_agree_with_one_at_a_time(tmp_path, prepared_data_dir):
    data = ["--data_dir", prepared_data_dir]
    side = study.Study(tmp_path / "side", [*SMOKE, *data], jobs=2)
    alone = study.Study(tmp_path / "alone", [*SMOKE, *data])
    a, b = side.run(study.Arm("a", [], [1337, 1338])), alone.run(study.Arm("a", [], [1337, 1338]))
    assert a.values == pytest.approx(b.values, abs=1e-6) and a.run_steps == b.run_steps
    logs = sorted((tmp_path / "side" / "logs").iterdir())
    assert len(logs) == 2 and all("best val loss" in log.read_text() for log in logs)
    assert sum(f"(output: {log})" in (tmp_path / "side" / "log.txt").read_text() for log in logs) == 2
    for seed in (1337, 1338):  # each with its share of the cores
        record = ex.read_json(side.run_seed([], seed)[0] / "run.json")
        assert record["device"]["torch_threads"] == max(1, (os.cpu_count() or 1) // 2)
    assert not (tmp_path / "alone" / "logs").exists()


def test_a_config_field_added_later_keeps_the_cache_at_its_default_and_splits_it_away_from_it(tmp_path, monkeypatch):
    s = study.Study(tmp_path / "study", SMOKE)
    fake = FakeRuns()
    monkeypatch.setattr(s, "sh", fake)
    folder, key = s.run_seed([], 1337)
    # a result recorded before batch_grows_with_world existed is reused: the field's default changes nothing
    older = json.loads((folder / study.KEY_FILE).read_text())
    del older["config"]["batch_grows_with_world"]
    (folder / study.KEY_FILE).write_text(json.dumps(older))
    assert s.run_seed([], 1337)[0] == folder and len(fake.calls) == 1
    # a field added after this cache was written names the same folder at its default, another one off it
    defaults = study.config_defaults()
    for value, same in ((0, True), (1, False)):
        monkeypatch.setattr(study, "run_key", lambda *a, v=value: {**key, "config": {**key["config"], "new_knob": v}})
        monkeypatch.setattr(study, "config_defaults", lambda: {**defaults, "new_knob": 0})
        assert (study.run_folder(s.runs, [*SMOKE], "shakespeare_char", 1337)[0] == folder) is same

# --- statistics ---

def test_holm_on_a_known_example_and_monotone_in_the_raw_order():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    rng = np.random.default_rng(1)
    for _ in range(20):
        p = list(rng.uniform(0, 0.2, size=7))
        adjusted = stats.holm(p)
        order = np.argsort(p)
        assert all(np.diff(np.array(adjusted)[order]) >= 0)  # a smaller raw p never gets a larger adjusted p
        assert all(a >= r for a, r in zip(adjusted, p)) and max(adjusted) <= 1


def test_paired_interval_and_p_agree_with_scipy():
    rng = np.random.default_rng(2)
    for n in (2, 5, 12):
        a, b = rng.normal(size=n), rng.normal(size=n) + 0.3
        d = stats.paired_difference(a, b)
        result = scipy_stats.ttest_rel(a, b)
        low, high = result.confidence_interval(0.95)
        assert d.p == pytest.approx(result.pvalue, rel=1e-12) and d.n == n
        assert (d.low, d.high) == pytest.approx((low, high), rel=1e-10)
        assert d.mean == pytest.approx(np.mean(a - b))
        assert stats.mean_interval(a - b) == pytest.approx((low, high), rel=1e-10)
    one = stats.paired_difference([1.0], [0.5])
    assert (one.mean, one.low, one.p) == (0.5, None, None)
    assert stats.paired_difference([1.0, 2.0], [1.0, 2.0]).p is None  # every difference 0: no test


def test_table_pairs_on_shared_seeds_and_holm_adjusts_over_every_row():
    base = study.Arm("cosine", values={1: 1.0, 2: 1.1, 3: 1.2, 4: 1.05}, run_steps=400)
    better = study.Arm("rl", values={1: 0.9, 2: 1.02, 3: 1.08, 4: 0.97, 9: 5.0}, run_steps=400, extra_steps=1000)
    noise = study.Arm("random", values={1: 1.01, 2: 1.08, 3: 1.23, 4: 1.04}, run_steps=400)
    rows = study.table([(better, base), (noise, base)])
    assert [r["comparison"] for r in rows] == ["rl - cosine", "random - cosine"]
    assert rows[0]["n"] == 4  # seed 9 has no partner
    raw = [scipy_stats.ttest_rel([better.values[s] for s in (1, 2, 3, 4)], [1.0, 1.1, 1.2, 1.05]).pvalue,
           scipy_stats.ttest_rel([1.01, 1.08, 1.23, 1.04], [1.0, 1.1, 1.2, 1.05]).pvalue]
    assert [r["p"] for r in rows] == pytest.approx(raw)
    assert [r["p_holm"] for r in rows] == pytest.approx(stats.holm(raw))
    assert rows[0]["compute_steps"] == {"rl": 1400, "cosine": 400}
    with pytest.raises(ValueError, match="share no seed"):
        study.table([(study.Arm("x", values={5: 1.0}), base)])


def test_summary_files_record_the_table_the_arms_and_where_they_came_from(tmp_path):
    base = study.Arm("cosine", ["--learning_rate", 1e-3], [1337, 1338], values={1337: 1.5, 1338: 1.6}, run_steps=60)
    rl = study.Arm("rl", [], [1337, 1338], values={1337: 1.4, 1338: 1.55}, run_steps=60, extra_steps=600)
    rows = study.table([(rl, base)])
    text = study.write_summary(tmp_path, "Does rl beat cosine?", [base, rl], rows, notes=["tuned LR 1e-3"],
                               extra={"tuned_lr": 1e-3})
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["question"] == "Does rl beat cosine?" and summary["tuned_lr"] == 1e-3
    assert summary["commit"] and summary["machine"] and summary["date"] and summary["command"]
    assert summary["arms"]["rl"]["compute_steps"] == 660 and summary["arms"]["cosine"]["n"] == 2
    assert summary["arms"]["cosine"]["mean"] == pytest.approx(1.55)
    assert summary["comparisons"][0]["mean"] == pytest.approx(-0.075) and summary["comparisons"][0]["p_holm"]
    assert (tmp_path / "summary.md").read_text() == text
    assert "rl - cosine" in text and "p (Holm)" in text and "660" in text and summary["commit"] in text
    assert text.rstrip().endswith("tuned LR 1e-3")
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing half-written left behind


def test_no_bench_study_or_plot_defines_its_own_statistics():
    for path in [ROOT / "plot.py", ROOT / "experiment.py", *sorted((ROOT / "bench").glob("*.py"))]:
        text = path.read_text()
        assert "t.ppf" not in text and "ttest_rel" not in text and "def holm" not in text, path.name
    for path in sorted((ROOT / "bench").glob("*.py")):
        assert path.name == "study.py" or "import study" in path.read_text(), path.name


# --- the leaderboard's learners train until their learning curve is flat ---

def falling_curve(episodes: int, falls_for: int) -> list[dict]:
    """A learning curve whose final loss depends on the drawn base LR and falls 0.5 nats per 100 episodes for
    its first falls_for episodes, then stays (give or take 0.02, alternating: noise without a trend); its rate sits
    1 octave from the tuned 8e-3."""
    rng = np.random.default_rng(0)
    curve = []
    for k in range(episodes):
        factor = float(np.exp(rng.uniform(np.log(0.1), np.log(10))))
        loss = 2.0 + 0.1 * np.log(factor) ** 2 - 0.005 * min(k, falls_for) + 0.02 * (-1) ** k
        curve.append({"lr_factor": factor, "final_val_loss": loss, "lr_trajectory": [[0, 4e-3], [100, 1.6e-2]]})
    return curve


class CurveStudy:
    """Study's train_controller, played by a curve that falls for falls_for episodes: records each request."""
    def __init__(self, root, falls_for):
        self.root, self.falls_for, self.requests = root, falls_for, []

    def train_controller(self, name, episodes, *flags):
        self.requests.append(episodes)
        ex.atomic_write_json(self.root / "learning_curve.json", falling_curve(episodes, self.falls_for))
        return self.root, episodes


@pytest.mark.parametrize("falls_for, requests", [(0, [304]), (10_000, [304, 456, 608]), (300, [304, 456])])
def test_a_learner_trains_on_by_half_its_episodes_while_its_curve_still_falls(tmp_path, falls_for, requests):
    s = CurveStudy(tmp_path, falls_for)
    assert study.train_until_flat(s, 304, 608, 8e-3, "ppo") == (tmp_path, requests[-1])
    assert s.requests == requests


def test_the_learning_curve_takes_the_base_lr_luck_out_and_measures_distance_from_the_tuned_rate(tmp_path):
    ex.atomic_write_json(tmp_path / "learning_curve.json", falling_curve(200, 0))
    curve = study.learning_curve(tmp_path, 8e-3)
    assert max(abs(r) for r in curve["residual"]) < 0.1  # the 0.1 * log(factor)^2 spread (up to 0.53) is gone
    assert curve["distance_from_tuned"] == pytest.approx([1.0] * 200)  # its second half sits at 1.6e-2
    low, high = curve["last_slope"]["ci95"]
    assert low <= 0 <= high and "(flat)" in study.curve_note("ppo", curve)


class OrderStudy:
    """Study played without running anything: every arm gets made-up losses; records what ran, in order."""
    def __init__(self, root, common=(), dataset="shakespeare_char", data_dir=None, jobs=1, events=None):
        self.root, self.dataset, self.events = Path(root), dataset, events

    def run(self, arm):
        self.events.append(("run", arm.name))
        arm.values = {seed: 3.0 + 0.01 * (seed % 5) + 0.001 * len(arm.name) for seed in arm.seeds}
        arm.run_steps = 10 * len(arm.seeds)
        return arm

    def run_all(self, arms):
        return {arm.name: self.run(arm) for arm in arms}

    def train_controller(self, name, episodes, *flags):
        self.events.append(("train", name))
        folder = self.root / "agents" / name
        folder.mkdir(parents=True, exist_ok=True)
        ex.atomic_write_json(folder / "learning_curve.json", falling_curve(episodes, 0))
        return folder, episodes

    def side_by_side(self, work, items):
        return [work(item) for item in items]

    def run_seed(self, flags, seed, beside=False):
        return self.root, {"config": {"max_iters": 10}}

    def metric_of(self, folder):
        return 3.0


def test_the_leaderboard_trains_its_costliest_controller_last_and_summarises_the_rest_first(tmp_path, monkeypatch):
    """The anchored ppo (a reference run per episode) comes last: an interrupted study has every other row,
    in an interim summary."""
    import lr_leaderboard
    events = []
    monkeypatch.setattr(lr_leaderboard, "Study", lambda *a, **kw: OrderStudy(*a, **kw, events=events))
    train_anchored, interim = lr_leaderboard.train_anchored, {}

    def anchored_after_an_interim_summary(*a):
        interim.update(json.loads((tmp_path / "summary.json").read_text()))
        return train_anchored(*a)
    monkeypatch.setattr(lr_leaderboard, "train_anchored", anchored_after_an_interim_summary)
    lr_leaderboard.main(["--out", str(tmp_path), "--profile", "smoke", "--seeds", "2", "--episodes", "8"])
    anchored = events.index(("train", "anchored_ppo"))
    assert events[anchored:anchored + 2] == [("train", "anchored_ppo"), ("run", "anchored_ppo_x1")]
    assert events[-1] == ("run", "tuned_fine")  # its controls come after it (the replay runs seed by seed)
    assert {("train", agent) for agent in ("ppo", "reinforce", "qlearning")} <= set(events[:anchored])
    assert {"enwik8_ppo_x10", "prodigy", "ppo_x0.1"} <= {name for kind, name in events[:anchored]}
    assert interim["complete"] is False and "anchored_ppo_x1" not in interim["arms"] and "ppo_x10" in interim["arms"]
    final = json.loads((tmp_path / "summary.json").read_text())
    assert final["complete"] is True and {"anchored_ppo_x1", "anchored_replay_x1", "tuned_fine"} <= set(final["arms"])
    compared = {(row["a"], row["b"]) for row in final["comparisons"]}
    assert {("anchored_ppo_x1", "tuned_fine"), ("anchored_ppo_x1", "anchored_replay_x1")} <= compared
    assert final["arms"]["tuned_fine"]["extra_steps"] == final["sweep_steps"] + final["fine_sweep_steps"] > 0
    # quarter octaves over x0.5..x2 of the tuned rate: 6 new ones, and the coarse sweep's within that reach (at
    # the smoke profile both of its rates, 1e-3 and 2e-3; on the real sweep x0.5, x1 and x2)
    assert len(final["fine_sweep"]) == 8
    assert final["fine_tuned_lr"] == 0.001 and min(final["fine_sweep"], key=final["fine_sweep"].get) == "0.001"
    assert final["arms"]["enwik8_ppo_x10"]["extra_steps"] == final["training_steps"]["ppo"] > 0  # transfer: charged
    assert set(final["transfer_tuned_lr"]) == {"enwik8"}
    assert "Interim" not in (tmp_path / "summary.md").read_text()


def test_a_leaderboard_rate_above_the_lr_ceiling_lifts_it_and_one_below_leaves_the_flags_as_they_were():
    import lr_leaderboard
    assert lr_leaderboard.rate_flags(0.08) == ["--learning_rate", 0.08, "--min_lr", 0.008]
    assert lr_leaderboard.rate_flags(0.16) == ["--learning_rate", 0.16, "--min_lr", 0.016, "--lr_ceiling", 0.16]
    from harness.validation import check_rate_bounds
    with pytest.raises(ex.UserError, match="above --lr_ceiling"):  # what x10 of text8's tuned 1.6e-2 met
        check_rate_bounds(study.resolved_config(["--learning_rate", 0.16, "--min_lr", 0.016], "text8", 1337))
    cfg = study.resolved_config(lr_leaderboard.rate_flags(0.16), "text8", 1337)
    check_rate_bounds(cfg)  # experiment.py accepts it
    assert cfg.learning_rate == cfg.lr_ceiling == 0.16


def test_the_sweep_study_compares_every_search_with_tuned_cosine_and_ppo_with_every_rival():
    import sweep_study
    pairs = sweep_study.pairs_of(8)
    assert len(pairs) == len(set(pairs))
    assert {("grid_8", "tuned_cosine_8"), ("random_8", "tuned_cosine_8"), ("pbt_8", "tuned_cosine_8"),
            ("pbt_8", "random_8"), ("random_8", "grid_8")} <= set(pairs)
    assert {b for a, b in pairs if a == "ppo_8"} == {"cosine", "grid_8", "random_8", "pbt_8", "tuned_cosine_8"}
    assert {b for a, b in sweep_study.until_flat_pairs(27)} == {"cosine", "ppo_27", "grid_27", "random_27",
                                                               "pbt_27", "tuned_cosine_27"}


def fake_prune_folder(keys: list[str], rng) -> dict:
    """A prune folder's final_info.json as the study reads it: each key's loss, steps and search steps."""
    def entry(steps: int, search: float) -> dict:
        loss = float(2 + rng.random())
        return {"final_info_dict": {"full_val_loss": [loss], "full_val_loss_before": [loss + 0.1],
                                    "steps_trained": [steps], "search_steps": [search]}}
    return {"unpruned": entry(2000, 0), **{key: entry(2004, 3.0) for key in keys}}


def test_the_prune_studys_interim_summary_holds_the_shortest_fine_tuning_alone(tmp_path):
    import prune_study
    args = prune_study.parse(["--smoke", "--out", str(tmp_path)])  # fine-tuning lengths 4 and 8
    first = prune_study.only(args, [4])
    assert prune_study.folders(first) == {k: v for k, v in prune_study.folders(args).items() if k.endswith("_4")}
    rng = np.random.default_rng(0)
    keys = [f"{m}_{t:g}" for m in prune_study.METHODS for t in prune_study.TARGETS]
    held = {"plain_4": keys + ["unpruned_finetuned"], "distilled_4": keys[1::3],  # distilled: at 0.5 alone
            "long_4": ["rl_0.5", "random_search_0.5"]}  # the searches given more episodes
    pruned = {(name, seed, search_seed): fake_prune_folder(held[name], rng)
              for name in held for seed in (1337, 1338, 1339) for search_seed in (0, 1)}
    arms = prune_study.arms_of(pruned, first)
    assert not [name for name in arms if "@8" in name or "scratch" in name]
    assert arms["rl_0.5 @4"].run_steps == 4 * 6 and arms["rl_0.5 @4"].extra_steps == 3 * 6  # 3 models x 2 seeds
    # 3 targets x 5, 6 before fine-tuning, 5 distilled, 5 with the long searches
    rows = study.table(prune_study.comparisons(arms, first))
    assert len(rows) == 31 and all(r["n"] == 3 for r in rows)
    assert "rl_0.5 x6 @4 - random_search_0.5 x6 @4" in {r["comparison"] for r in rows}
    # the full study's longest folders hold the from-scratch control; the interim has none of it
    assert "--scratch" in prune_study.folders(args)["plain_8"][2]
    assert "--scratch" not in prune_study.folders(first)["plain_4"][2]
    assert prune_study.folders(args)["long_4"][:2] == (("rl", "random_search"), 6)


def fake_prune_study_arms(args) -> dict:
    """arms_of a whole smoke-sized study (3 models x 2 search seeds) whose folders hold fake numbers."""
    import prune_study
    rng = np.random.default_rng(0)
    keys = [f"{m}_{t:g}" for m in prune_study.METHODS for t in prune_study.TARGETS]
    at_half = [k for k in keys if k.endswith("_0.5")]
    scratch = [f"{m}_0.5_scratch" for m in prune_study.METHODS[:4]]
    held = {"plain_4": keys + ["unpruned_finetuned"], "plain_8": keys + scratch + ["unpruned_finetuned"],
            "distilled_4": at_half, "distilled_8": at_half, "long_4": ["rl_0.5", "random_search_0.5"],
            "tuned_8": at_half + ["unpruned_finetuned"]}
    pruned = {(name, seed, search_seed): fake_prune_folder(held[name], rng)
              for name in held for seed in (1337, 1338, 1339) for search_seed in (0, 1)}
    return prune_study.arms_of(pruned, args)


def tuned_smoke_args():
    """The smoke study's arguments (lengths 4 and 8, two rates) once its rate sweep chose 2e-3."""
    import prune_study
    args = prune_study.parse(["--smoke", "--out", "unused"])
    args.tuning = {"model": "tuning_run", "rate": 2e-3, "loss_by_rate": {1e-3: 2.1, 2e-3: 2.0}, "steps": 100}
    return args


def test_the_prune_studys_tuned_arms_fine_tune_at_the_swept_rate_and_are_charged_the_sweep():
    import prune_study
    untuned = prune_study.parse(["--smoke", "--out", "unused"])
    assert untuned.rates == [1e-3, 2e-3]
    assert not [name for name in prune_study.folders(untuned) if name.startswith("tuned")]  # not before the sweep
    args = tuned_smoke_args()
    plan = prune_study.folders(args)
    assert plan["tuned_8"][2][-2:] == ["--finetune_lr", 2e-3] and "tuned_4" not in plan
    arms = fake_prune_study_arms(args)
    # the sweep is charged to every tuned arm, on top of the arm's own search
    assert arms["rl_0.5 tuned @8"].extra_steps == 3 * 6 + 100 and arms["rl_0.5 @8"].extra_steps == 3 * 6
    assert "unpruned_finetuned tuned @8" in arms
    rows = {r["comparison"]: r for r in study.table(prune_study.comparisons(arms, args))}
    # 55, and per method against the default rate (5), the pairs at the tuned rate (5), against scratch (4)
    assert len(rows) == 55 + 14
    assert {"rl_0.5 tuned @8 - rl_0.5 @8", "rl_0.5 tuned @8 - random_search_0.5 tuned @8",
            "global_0.5 tuned @8 - global_0.5_scratch"} <= set(rows)
    assert "Fine-tuning rate of the tuned arms: 0.002 (the sweep's edge" in prune_study.tuning_notes(args)[0]
    assert prune_study.tuning_notes(prune_study.only(args, [4])) == []  # the interim has no tuned arms
    with pytest.raises(ex.UserError, match="--finetune_rates"):
        prune_study.parse(["--out", "unused", "--finetune_rates", "1e-3,fast"])
    with pytest.raises(ex.UserError, match="--finetune_rates"):
        prune_study.parse(["--out", "unused", "--finetune_rates", "0,1e-3"])


def test_the_prune_studys_grid_puts_each_kind_of_arm_on_a_row_and_each_target_in_a_column():
    import prune_study
    arms = fake_prune_study_arms(tuned_smoke_args())
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in prune_study.grid_lines(arms)
            if line.startswith("| ")]
    grid = {row[0]: row[1:] for row in rows}
    assert grid["arm"] == ["1", "0.75", "0.5", "0.3"]  # 1: nothing pruned
    assert all(" ± " in cell for cell in grid["rl @8"][1:]) and grid["rl @8"][0] == ""
    assert [bool(cell) for cell in grid["rl tuned @8"]] == [False, False, True, False]
    assert [bool(cell) for cell in grid["unpruned_finetuned tuned @8"]] == [True, False, False, False]
    assert grid["global_scratch"][2] and grid["rl before fine-tuning"][3]
    rl_half = list(arms["rl_0.5 @8"].values.values())
    assert grid["rl @8"][2] == "{:.4f} ± {:.4f}".format(*stats.mean_and_stderr(rl_half))


def test_the_prune_studys_search_notes_say_whether_ppos_episodes_still_improve():
    import prune_study
    args = prune_study.parse(["--smoke", "--out", "unused"])
    args.episodes, args.long_episodes = 100, 400
    rng = np.random.default_rng(0)

    def learning(n: int) -> list:  # falls for 200 episodes, then flat; the last score is the greedy episode's
        return list(3 - np.minimum(np.arange(n), 200) / 200 + rng.normal(0, 0.05, n))

    def flat(n: int) -> list:
        return list(3 + rng.normal(0, 0.05, n))

    searches = {(name, seed, 0): {"rl_0.5": {"scores": learning(n + 1)}, "random_search_0.5": {"scores": flat(n + 1)}}
                for name, n in (("plain_4", 100), ("long_4", 400)) for seed in (1337, 1338)}
    panels = prune_study.curves_by_panel(searches, args)
    assert set(panels) == {"0.5 of the FLOPs, 100 episodes", "0.5 of the FLOPs, 400 episodes"}
    assert [len(s) for s in panels["0.5 of the FLOPs, 100 episodes"]["rl"]] == [100, 100]  # greedy left out
    notes = prune_study.search_notes(panels)

    def line(method: str, episodes: int) -> str:
        return next(n for n in notes if n.startswith(f"- {method}, 0.5 of the FLOPs, {episodes} episodes"))
    assert "(still moving)" in line("rl", 100) and "(flat)" in line("rl", 400)
    assert "(flat)" in line("random_search", 100) and "(flat)" in line("random_search", 400)
