"""The job manager: one background worker, a visible queue, cancel for queued and running jobs."""
import threading

from dpcore.config import RunConfig
from dpcore.store.events import Event
from dpcore.training.jobs import JobManager
from dpcore.store.runs import RunStore
from dpcore.training.trainer import TrainResult


def _blocking_train(release: threading.Event):
    def fake_train(config, store, listener=None, cancel=None, run_id=None):
        store.set_status(run_id, "running")
        step = 0
        while not release.is_set():
            if cancel.is_set():
                store.set_status(run_id, "cancelled")
                return TrainResult(run_id, "cancelled", {})
            step += 1
            listener(Event("step", run_id, step=step))
            release.wait(0.01)
        store.set_status(run_id, "done")
        return TrainResult(run_id, "done", {})
    return fake_train


def test_jobs_run_one_at_a_time_and_queue_is_visible(tmp_path):
    release = threading.Event()
    store = RunStore(tmp_path)
    mgr = JobManager(store, train_fn=_blocking_train(release))
    a = mgr.submit(RunConfig(epsilon=1.0), label="a")
    b = mgr.submit(RunConfig(epsilon=2.0), label="b")
    for _ in range(200):
        if mgr.current() is a and a.events.snapshot():
            break
        threading.Event().wait(0.01)
    assert mgr.current() is a and a.status == "running"
    assert mgr.queued() == [b] and b.status == "queued"
    assert store.get_run(b.run_id).status == "queued"
    release.set()
    assert mgr.wait(a.run_id, 5).status == "done"
    assert mgr.wait(b.run_id, 5).status == "done"
    assert [j.run_id for j in mgr.jobs()] == [b.run_id, a.run_id]


def test_cancel_queued_and_running(tmp_path):
    release = threading.Event()
    store = RunStore(tmp_path)
    mgr = JobManager(store, train_fn=_blocking_train(release))
    a = mgr.submit(RunConfig())
    b = mgr.submit(RunConfig())
    mgr.cancel(b.run_id)
    assert b.status == "cancelled" and store.get_run(b.run_id).status == "cancelled"
    mgr.cancel(a.run_id)
    assert mgr.wait(a.run_id, 5).status == "cancelled"
    assert store.get_run(a.run_id).status == "cancelled"


def test_failure_is_reported_and_worker_survives(tmp_path):
    calls = []

    def flaky(config, store, listener=None, cancel=None, run_id=None):
        calls.append(run_id)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return TrainResult(run_id, "done", {})

    mgr = JobManager(RunStore(tmp_path), train_fn=flaky)
    a, b = mgr.submit(RunConfig()), mgr.submit(RunConfig())
    assert mgr.wait(a.run_id, 5).status == "failed" and "out of memory" in a.error
    assert mgr.wait(b.run_id, 5).status == "done"


def test_real_tiny_job_streams_events(tmp_path):
    mgr = JobManager(RunStore(tmp_path))
    job = mgr.submit(RunConfig(dataset="digits", backbone="tiny_cnn", image_size=16, epochs=1, batch_size=256,
                               epsilon=4.0))
    done = mgr.wait(job.run_id, 120)
    assert done.status == "done"
    kinds = [e.kind for e in done.events.snapshot()]
    assert kinds.count("step") >= 5 and kinds[-1] == "finished"
    assert done.latest("finished").data["card"]["epsilon"] <= 4.0
