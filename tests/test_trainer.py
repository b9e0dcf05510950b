"""The one trainer: resume, hooks, checkpoints, progress without a terminal, TensorBoard
curves equal to the JSONL, a jax.profiler trace, and a stop whose KeyboardInterrupt was
swallowed."""

import contextlib
import logging as std_logging
import struct

import jax.numpy as jnp
import pytest
from absl import logging

from ffrag_jax.training import checkpoint, interrupts
from ffrag_jax.training.metrics import MetricsLog, read_jsonl
from ffrag_jax.training.progress import Progress
from ffrag_jax.training.trainer import Trainer, profile_range


def _count_step(state, step):
    return {"x": state["x"] + 1.0}, {"loss": float(10 - step)}


def _trainer(tmp_path, total, **kwargs):
    metrics = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=tmp_path / "tensorboard")
    return Trainer("toy", ckpt_dir=tmp_path / "checkpoints", metrics=metrics, total=total,
                   **kwargs), metrics


def test_hooks_checkpoints_and_resume_at_the_last_checkpoint(tmp_path):
    trainer, metrics = _trainer(tmp_path, 5, checkpoint_every=2)
    seen = []
    trainer.add_hook(lambda info: seen.append((info.step, float(info.state["x"]))), every=3)
    trainer.add_hook(lambda info: metrics.write(kind="train", phase="toy", step=info.step,
                                                **info.out))

    def dies_at_step_4(state, step):
        if step == 3:
            raise KeyboardInterrupt("killed")
        return _count_step(state, step)

    start, state = trainer.initial_state({"x": jnp.zeros(())})
    with pytest.raises(KeyboardInterrupt):
        trainer.run(state, dies_at_step_4, start)
    checkpoint.wait_for_pending_saves()  # as run() does on any exception
    assert seen == [(3, 3.0)]
    again, _ = _trainer(tmp_path, 5, checkpoint_every=2)
    start, state = again.initial_state({"x": jnp.zeros(())})
    assert (start, float(state["x"])) == (2, 2.0)  # the checkpoint of step 2
    again.add_hook(lambda info: seen.append((info.step, float(info.state["x"]))), every=3)
    final = again.run(state, _count_step, start)
    assert float(final["x"]) == 5.0 and seen[1:] == [(3, 3.0), (5, 5.0)]  # and the last


def test_progress_without_a_terminal_logs_the_rate_and_the_eta(caplog):
    caplog.set_level(logging.INFO)
    with Progress("rounds", total=4, initial=1, unit="round", every_s=0.0,
                  terminal=False) as p:
        p.show(loss=0.25)
        p.within("client 0:clinic", 3, 10)
        p.update(2)
    text = caplog.text
    assert "rounds 2/4: client 0:clinic 3/10" in text
    assert "rounds 2/4 (50%)" in text and "round/s  ETA " in text and "loss 0.25" in text


def _events(folder):
    """``{tag: [(step, value)]}`` of a TensorBoard event folder (TFRecord framing read by
    hand; the Event protos parsed by tensorboardX's own classes)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


@contextlib.contextmanager
def records_of(logger_name):
    """The stdlib logging records of every level that ``logger_name`` (and its children)
    emits inside (tensorboardX reports an illegal summary name at INFO)."""
    seen = []
    handler = std_logging.Handler(std_logging.DEBUG)
    handler.emit = seen.append
    logger = std_logging.getLogger(logger_name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(std_logging.DEBUG)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_tensorboard_curves_are_the_jsonl_values(tmp_path):
    trainer, metrics = _trainer(tmp_path, 4)
    trainer.add_hook(lambda info: metrics.write(kind="train", phase="toy", step=info.step,
                                                **info.out))
    start, state = trainer.initial_state({"x": jnp.zeros(())})
    trainer.run(state, _count_step, start)
    with records_of("tensorboardX") as said:
        metrics.write(kind="eval", round=1, client=0, name="0:clinic", model="fused",
                      loss=0.5, **{"recall@1": 0.25})
    metrics.close()
    assert not said  # the tags were legal already (no message per name)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    curves = _events(tmp_path / "tensorboard/toy")
    assert curves["train/loss"] == [(r["step"], r["loss"]) for r in records if "phase" in r]
    # (TensorBoard tags keep [A-Za-z0-9_./-]: "0:clinic" is written "0_clinic")
    assert _events(tmp_path / "tensorboard/eval") == {"eval/fused/0_clinic/loss": [(1, 0.5)],
                                                      "eval/fused/0_clinic/recall_1": [(1, 0.25)]}


def test_a_profile_trace_of_the_asked_steps(tmp_path):
    trainer, _ = _trainer(tmp_path, 3, profile_steps=(2, 3), profile_dir=tmp_path / "profile")
    start, state = trainer.initial_state({"x": jnp.zeros(())})
    trainer.run(state, _count_step, start)
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert profile_range(None) is None and profile_range(2) == (2, 2)
    with pytest.raises(Exception, match="profile_steps=\\(3, 1\\)"):
        profile_range((3, 1))


def test_a_stop_whose_keyboard_interrupt_was_swallowed_still_stops(tmp_path, monkeypatch):
    trainer, _ = _trainer(tmp_path, 10)
    ran = []

    def step(state, i):
        ran.append(i)
        if i == 2:
            interrupts.request("SIGTERM")  # as the launcher's handler does; the
            try:  # KeyboardInterrupt it raised was caught by a library here
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                pass
        return _count_step(state, i)

    monkeypatch.setattr(interrupts, "_requested", [])
    start, state = trainer.initial_state({"x": jnp.zeros(())})
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        trainer.run(state, step, start)
    assert ran == [0, 1, 2]  # stopped at the step boundary after the swallowed interrupt


def test_a_run_resumed_inside_the_profile_range_traces_the_rest(tmp_path):
    first, _ = _trainer(tmp_path, 3, checkpoint_every=1)
    start, state = first.initial_state({"x": jnp.zeros(())})
    first.run(state, _count_step, start)
    again, _ = _trainer(tmp_path, 5, checkpoint_every=1, profile_steps=(2, 4),
                        profile_dir=tmp_path / "profile")
    start, state = again.initial_state({"x": jnp.zeros(())})
    assert start == 3
    again.run(state, _count_step, start)  # starts tracing at step 4, stops after it
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))
