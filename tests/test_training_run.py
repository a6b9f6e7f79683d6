"""One training run, advanced by a caller from evaluation to evaluation: the CLI's loop is one such caller."""
import json

import experiment as ex
from conftest import run_cli


def smoke_config(data_dir, **kw):
    base = ex.config_for_dataset(ex.Config(data_dir=str(data_dir)), {}, "smoke", "shakespeare_char")
    return ex.dataclasses.replace(base, inference_samples=1, **kw)


def test_stepping_by_hand_equals_the_cli_run_with_the_same_multipliers(prepared_data_dir, tmp_path):
    out = tmp_path / "cli"
    proc = run_cli(["--out_dir", out, "--profile", "smoke", "--datasets", "shakespeare_char", "--data_dir",
                    prepared_data_dir, "--agent", "random", "--notes", "off", "--inference_samples", "1"])
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "all_results.json").read_text())
    cli_val, cli_train = results["shakespeare_char_0_val_info"], results["shakespeare_char_0_train_info"]
    plan = {r["iter"]: r["multiplier"] for r in cli_val}

    cfg = smoke_config(prepared_data_dir)
    data = ex.load_dataset(cfg, "shakespeare_char")
    run = ex.TrainingRun(cfg, data, 0, ex.Runtime.choose(cfg), tmp_path / "ckpt.pt")
    evaluations = []
    while True:
        result = run.advance()
        assert result.diverged is None and not result.interrupted
        evaluations.append((result.it, result.train_loss, result.val_loss))
        run.multiplier = plan[result.it]  # the decision a caller makes at this evaluation
        if result.done:
            break
    assert evaluations == [(r["iter"], r["train/loss"], r["val/loss"]) for r in cli_val]
    assert [(r["iter"], r["loss"], r["lr"]) for r in run.state.train_log] == \
        [(r["iter"], r["loss"], r["lr"]) for r in cli_train]
    assert run.finish("finished")["full_val_loss"] == results["shakespeare_char_0_final_info"]["full_val_loss"]


def test_advance_stops_before_a_step_when_asked_and_goes_on_after(prepared_data_dir, tmp_path):
    cfg = smoke_config(prepared_data_dir)
    run = ex.TrainingRun(cfg, ex.load_dataset(cfg, "shakespeare_char"), 0, ex.Runtime.choose(cfg),
                         tmp_path / "ckpt.pt")
    assert run.advance().it == 0  # the first evaluation, before any step
    steps = iter(range(100))
    result = run.advance(stop=lambda: next(steps) == 3)  # asked to stop before the fourth step
    assert result.interrupted and result.it == 3 and run.state.next_it == 3
    assert run.advance().it == cfg.eval_interval  # and it goes on from there to the next evaluation


def test_a_finished_run_advances_no_further(prepared_data_dir, tmp_path):
    cfg = smoke_config(prepared_data_dir, max_iters=10, lr_decay_iters=10, warmup_iters=2)
    run = ex.TrainingRun(cfg, ex.load_dataset(cfg, "shakespeare_char"), 0, ex.Runtime.choose(cfg),
                         tmp_path / "ckpt.pt")
    while not (result := run.advance()).done:
        pass
    steps = len(run.state.train_log)
    again = run.advance()
    assert again.done and again.it == 10 and again.val_loss == result.val_loss
    assert len(run.state.train_log) == steps
