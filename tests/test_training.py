"""Shared training pieces: EMA, resumable checkpoints, strict overrides."""

import json
import os
import sys

import preforked_runner
import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer

from brainsynth.engine.io import load_checkpoint
from brainsynth.engine.training import (
    CHECKPOINT_LAST,
    EMAHandler,
    ResumableCheckpoint,
    check_overrides,
    reject_unknown_overrides,
)


def test_ema_resets_before_start_then_averages():
    net = torch.nn.Linear(2, 1, bias=False)
    ema = EMAHandler(net, decay=0.9, update_every=2, start_step=4)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(1)  # not an update step
    assert not torch.equal(ema.ema_network.weight, net.weight)
    ema.update(2)  # before start: copy
    torch.testing.assert_close(ema.ema_network.weight, net.weight)
    with torch.no_grad():
        net.weight.fill_(3.0)
    ema.update(4)  # averaging: 0.9 * 1 + 0.1 * 3
    torch.testing.assert_close(ema.ema_network.weight, torch.full((1, 2), 1.2))
    assert not ema.ema_network.weight.requires_grad


def _trainer(net, max_epochs, handlers):
    g = torch.Generator().manual_seed(0)  # the same three batches in every trainer
    data = [{"image": torch.randn(2, 3, generator=g), "label": torch.randn(2, 1, generator=g)} for _ in range(3)]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=data,
        network=net,
        optimizer=opt,
        loss_function=torch.nn.MSELoss(),
        train_handlers=None,
    )
    return trainer, opt


def test_training_resumes_from_last_checkpoint(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    trainer, opt = _trainer(net, 2, None)
    ema = EMAHandler(net, decay=0.5, update_every=1, start_step=0)
    ema.attach(trainer)
    ckpt = ResumableCheckpoint(
        tmp_path,
        {"network": net, "optimizer": opt, "ema": ema, "trainer": trainer},
        final_model_path=tmp_path / "model.pt",
        final_from="ema",
    )
    ckpt.attach(trainer)
    trainer.run()
    assert trainer.state.iteration == 6
    saved = load_checkpoint(tmp_path / CHECKPOINT_LAST)
    assert saved["trainer"]["iteration"] == 6
    final = load_checkpoint(tmp_path / "model.pt")
    torch.testing.assert_close(final["weight"], ema.ema_network.weight)

    # a new process: fresh network, the same recipe with more epochs continues at iteration 6
    net2 = torch.nn.Linear(3, 1)
    trainer2, opt2 = _trainer(net2, 3, None)
    ema2 = EMAHandler(net2, decay=0.5, update_every=1, start_step=0)
    seen = []
    trainer2.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.iteration))
    ResumableCheckpoint(tmp_path, {"network": net2, "optimizer": opt2, "ema": ema2, "trainer": trainer2}).attach(
        trainer2
    )
    trainer2.run()
    assert seen == [7, 8, 9]  # only the third epoch runs
    # and it continues exactly: the same weights as one uninterrupted 3-epoch run from the same start
    torch.manual_seed(0)
    reference = torch.nn.Linear(3, 1)
    _trainer(reference, 3, None)[0].run()
    torch.testing.assert_close(net2.weight, reference.weight, rtol=0, atol=0)
    torch.testing.assert_close(net2.bias, reference.bias, rtol=0, atol=0)


def test_resume_refuses_a_foreign_checkpoint(tmp_path):
    net = torch.nn.Linear(3, 1)
    trainer, opt = _trainer(net, 1, None)
    torch.save({"something": 1}, tmp_path / CHECKPOINT_LAST)
    ResumableCheckpoint(tmp_path, {"network": net, "trainer": trainer}).attach(trainer)
    with pytest.raises(RuntimeError, match="lacks"):
        trainer.run()


def test_check_overrides_lists_valid_keys(tmp_path):
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps({"lr": 0.1, "train": {"trainer": {"max_epochs": 2}}}))
    check_overrides(str(cfg), {"lr": 1, "train#trainer#max_epochs": 3})
    with pytest.raises(KeyError) as e:
        check_overrides(str(cfg), {"train#trainer#max_epoch": 3})
    msg = str(e.value)
    assert "--train#trainer#max_epoch" in msg and "train#trainer#max_epochs" in msg


def test_reject_unknown_overrides_ignores_python_callers():
    assert reject_unknown_overrides(["script.py", "--anything", "1"]) is False


def test_monai_runner_fails_on_misspelled_override(tmp_path):
    cfg = tmp_path / "cfg.json"
    out = tmp_path / "out.txt"
    cfg.write_text(
        json.dumps(
            {
                "imports": ["$import brainsynth"],
                "epochs": 2,
                "initialize": ["$brainsynth.engine.training.reject_unknown_overrides()"],
                "run": [f"$open({str(out)!r}, 'w').write(str(@epochs))"],
            }
        )
    )
    base = [sys.executable, "-m", "monai.bundle", "run", "run", "--config_file", str(cfg)]
    ok = preforked_runner.run(base + ["--epochs", "5"], os.getcwd())
    assert ok.returncode == 0, ok.stderr
    assert out.read_text() == "5"
    bad = preforked_runner.run(base + ["--epoch", "5"], os.getcwd())
    assert bad.returncode != 0
    assert "--epoch: no such config key" in bad.stderr and "epochs" in bad.stderr


def test_atomic_outputs_get_normal_permissions(tmp_path):
    import os

    from brainsynth.engine.io import atomic_write_text

    umask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "out.json", "{}")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_final_weights_carry_a_hash_record_and_damaged_or_non_finite_weights_are_refused(tmp_path, caplog):
    """The one loader refuses a weight file that does not match its sha256 record (one flipped bit), and one holding
    NaN; a missing record is a warning that says how to make one; each message names the file."""
    import logging

    from brainsynth.engine.io import WeightIntegrityError, hash_record_path, load_checkpoint, save_checkpoint

    weights = {"conv.weight": torch.linspace(-1, 1, 64).reshape(4, 16)}
    path = save_checkpoint(weights, tmp_path / "model.pt", record=True)
    record = hash_record_path(path).read_text().split()
    assert record[1] == "model.pt" and len(record[0]) == 64
    assert torch.equal(load_checkpoint(path, require_record=True)["conv.weight"], weights["conv.weight"])

    data = bytearray(path.read_bytes())
    offset = data.rindex(weights["conv.weight"].numpy().tobytes()[:8]) + 3  # inside the tensor's bytes
    data[offset] ^= 0x40  # one flipped exponent bit
    path.write_bytes(bytes(data))
    with pytest.raises(WeightIntegrityError, match=f"^{path}: sha256 .* does not match its record"):
        load_checkpoint(path)

    nan = save_checkpoint({"w": torch.tensor([1.0, float("nan")])}, tmp_path / "nan.pt")  # no record
    with pytest.raises(WeightIntegrityError, match=f"^{nan}: 1 tensor\\(s\\) hold NaN or Inf \\(e.g. w\\)"):
        load_checkpoint(nan)
    plain = save_checkpoint(weights, tmp_path / "plain.pt")
    with caplog.at_level(logging.WARNING):
        load_checkpoint(plain, require_record=True)
    assert "has no integrity record" in caplog.text and "sha256sum plain.pt > plain.pt.sha256" in caplog.text


def test_a_fresh_training_never_replaces_final_weights_of_an_earlier_one(tmp_path):
    """No checkpoint to resume but a models/model.pt from an earlier training: refused before any step, unless
    overwrite; a resumed training (its checkpoint present) writes its own final weights as before."""
    from brainsynth.engine.io import save_checkpoint
    from brainsynth.engine.training import ResumableCheckpoint

    net = torch.nn.Linear(2, 2)
    earlier = save_checkpoint({"weight": torch.ones(2, 2), "bias": torch.ones(2)}, tmp_path / "model.pt")
    before = earlier.read_bytes()
    saver = ResumableCheckpoint(tmp_path / "ckpt", {"network": net}, final_model_path=earlier)
    with pytest.raises(FileExistsError, match=f"^{earlier}: already exists, written by an earlier training"):
        saver.load(None)
    assert earlier.read_bytes() == before
    ResumableCheckpoint(tmp_path / "ckpt", {"network": net}, final_model_path=earlier, overwrite=True).load(None)


def test_checkpoints_never_fall_inside_an_accumulation_phase(tmp_path):
    from brainsynth.engine.training import ResumableCheckpoint

    class _Engine:
        accumulation_steps = 2

        class state:
            epoch_length = 3

    with pytest.raises(ValueError, match="epoch_length 3 x save_every 1 is not a multiple of accumulation_steps 2"):
        ResumableCheckpoint(tmp_path, {"network": torch.nn.Linear(1, 1)}).attach(_Engine())


def _ddp_draws(rank: int, world: int, folder: str, port: int, out: str) -> None:
    """One rank: an uninterrupted 2-epoch run, then a run stopped after epoch 1 and resumed; the random draws of
    epoch 2 in both."""
    import torch.distributed as dist
    from ignite.engine import Engine, Events

    from brainsynth.engine.training import ResumableCheckpoint

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    draws: dict[str, list[float]] = {}

    def run(tag: str, root: str, epochs: int) -> None:
        engine = Engine(lambda e, b: torch.rand(1).item())
        engine.add_event_handler(
            Events.ITERATION_COMPLETED, lambda e: draws.setdefault(tag, []).append((e.state.iteration, e.state.output))
        )
        ResumableCheckpoint(root, {"trainer": engine}).attach(engine)
        engine.run(range(2), max_epochs=epochs)
        dist.barrier()  # as between two launches: the next run starts after this one's checkpoint is written

    torch.manual_seed(100 + rank)  # every rank its own stream, as the bundles' multi-GPU overlays seed
    run("whole", f"{folder}/whole", 2)
    torch.manual_seed(100 + rank)
    run("first", f"{folder}/resumed", 1)
    torch.manual_seed(999)  # a restarted process starts from some other state; the checkpoint restores each rank's
    run("resumed", f"{folder}/resumed", 2)
    dist.destroy_process_group()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(draws, f)


def test_each_rank_resumes_its_own_random_stream_under_ddp(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_draws, args=(2, str(tmp_path), port, str(tmp_path)), nprocs=2, join=True)
    draws = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in draws:
        epoch2 = [v for i, v in rank["whole"] if i > 2]
        assert [v for i, v in rank["resumed"] if i > 2] == epoch2 and len(epoch2) == 2
    assert draws[0]["whole"] != draws[1]["whole"]  # the ranks' streams differ, and each got its own back


def _fake_stat(path, total: int, idle: int) -> None:
    # /proc/stat's first line: user nice system idle iowait irq softirq steal guest guest_nice (jiffies)
    busy = total - idle
    path.write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 0 0 0 0 0 0 0 0 0 0\n")


@pytest.mark.parametrize("busy_share, expected", [(0.0, 4), (0.25, 3), (0.5, 2), (1.0, 1)])
def test_idle_cores_counts_the_cores_nobody_is_using(tmp_path, monkeypatch, busy_share, expected):
    import time

    from brainsynth.engine.training import idle_cores

    stat = tmp_path / "stat"
    _fake_stat(stat, total=1000, idle=500)
    # the interval passes: 400 jiffies over all four cores, busy_share of them busy
    monkeypatch.setattr(time, "sleep", lambda s: _fake_stat(stat, total=1400, idle=500 + round(400 * (1 - busy_share))))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert idle_cores(stat_path=str(stat)) == expected


def test_num_threads_takes_a_count_idle_or_null_and_refuses_anything_else():
    from brainsynth.engine.training import set_num_threads

    before = torch.get_num_threads()
    try:
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        assert 1 <= set_num_threads("idle") <= usable
        assert set_num_threads(1) == 1 and set_num_threads("1") == 1
        assert set_num_threads(None) == 1  # null leaves torch as it is
        for bad in (0, -2, 2.5, "two", True):
            with pytest.raises(ValueError, match="whole number >= 1, 'idle' or null"):
                set_num_threads(bad)
    finally:
        torch.set_num_threads(before)
