"""Large scoring jobs (`simplenet_fast.distributed`): one CSV in input order, every image exactly
once, the same bits in one process and in several, and resumable after any interruption.

The multi-process cases run real processes over gloo on localhost: torchrun itself (`python -m
torch.distributed.run --standalone`), and plain processes that set up torch.distributed from the
environment as a user's own launcher would. Kills are SIGKILL at a random point (the seed is
printed), with a tiny model and small images so that each case takes seconds.
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import simplenet_fast
from simplenet_fast import SimpleNet, distributed
from simplenet_fast.distributed import (JobError, UnreadableImageError, _decode, _encode,
                                        _fingerprint, format_score, heatmap_names, list_inputs,
                                        score_files)

N_IMAGES = 40
# The folder holding the simplenet_fast these tests import: the installed package after `pip
# install .`, the source tree in a development build. Child processes run from there and with it
# on PYTHONPATH, so that they import that same package (`python -m` puts its working directory
# first on sys.path): a clean clone has no compiled extension in its source tree, and a child
# importing it would silently score through the reference head instead.
PACKAGE_HOME = Path(simplenet_fast.__file__).resolve().parent.parent


def _proc(threads: int = 1, **extra_env: str) -> dict:
    """subprocess keyword arguments for a child process of these tests."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE", **extra_env,
               PYTHONPATH=os.pathsep.join([str(PACKAGE_HOME), os.environ.get("PYTHONPATH", "")]))
    for name in ("RANK", "WORLD_SIZE"):
        if name not in extra_env:
            env.pop(name, None)
    return {"env": env, "cwd": PACKAGE_HOME}


def _tiny_model(seed: int = 0) -> SimpleNet:
    torch.manual_seed(seed)
    model = SimpleNet("efficientnet_lite0", weights=None, image_size=32, resize=36,
                      pretrain_embed_dim=24, target_embed_dim=24, hidden=8)
    model.image_threshold, model.pixel_threshold = 0.0, 0.0  # labels and masks in the rows
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process jobs run on one torch thread: fast on a busy machine (spinning OpenMP threads
    slow a loaded 2-core machine down many times). The reference CSV is made so; the process
    cases compare it with two threads and with two processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def job(tmp_path_factory, one_thread):
    """A saved tiny model, a folder of images (one unreadable), and the reference CSV of one
    uninterrupted single-process run."""
    root = tmp_path_factory.mktemp("job")
    model_path = root / "model.pt"
    _tiny_model().save(model_path)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        size = (30 + i % 7, 33 + i % 5, 3)  # several sizes: crops differ in geometry too
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(images / f"im{i:03d}.png")
    (images / "im017b.png").write_bytes(b"not an image")  # sorted between im017 and im018
    reference = root / "reference.csv"
    errors = root / "reference_errors.csv"
    summary = score_files(str(model_path), images, reference, errors=errors, batch_size=4)
    assert summary.scored == N_IMAGES and summary.errors == 1
    return {"root": root, "model": model_path, "images": images, "csv": reference.read_text(),
            "errors": errors.read_text()}


def _rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def _work(csv_path: Path) -> Path:
    return csv_path.with_name(csv_path.name + ".parts")


# ---------------------------------------------------------------------------------- one process
def test_one_process_writes_every_image_once_in_input_order(job):
    rows = _rows(job["csv"])
    paths = sorted(str(p) for p in job["images"].glob("*.png") if p.name != "im017b.png")
    assert [r["path"] for r in rows] == paths
    expected = SimpleNet.load(job["model"]).score(paths, batch_size=7)
    # Bit for bit: the CSV holds the shortest text that reads back as the same float32.
    assert [r["score"] for r in rows] == [format_score(v) for v in expected.pred_score.tolist()]
    assert all(np.float32(r["score"]) == v for r, v in zip(rows, expected.pred_score.numpy()))
    assert [r["label"] for r in rows] == ["anomalous" if v else "normal"
                                          for v in expected.pred_label.tolist()]
    (error,) = _rows(job["errors"])
    assert error["path"].endswith("im017b.png") and "not an image" in error["error"]
    assert not _work(job["root"] / "reference.csv").exists()  # the work folder is gone


def test_stream_and_no_csv_in_one_process(job):
    stream = io.StringIO()
    summary = score_files(str(job["model"]), job["images"], stream, batch_size=8)
    assert _rows(stream.getvalue()) == _rows(job["csv"]) and summary.csv is None
    summary = score_files(str(job["model"]), job["images"], None, batch_size=8)
    assert summary.scored == N_IMAGES and summary.highest[0] == max(
        float(r["score"]) for r in _rows(job["csv"]))
    with pytest.raises(ValueError, match="resume needs csv_path"):
        score_files(str(job["model"]), job["images"], None, resume=True)


def test_strict_stops_at_an_unreadable_image_and_keeps_no_csv(job, tmp_path):
    out = tmp_path / "s.csv"
    with pytest.raises(UnreadableImageError, match="im017b.png"):
        score_files(str(job["model"]), job["images"], out, strict=True, batch_size=4)
    assert not out.exists() and _work(out).is_dir()  # what was done is kept for --resume
    score_files(str(job["model"]), job["images"], out, resume=True, batch_size=4)
    assert out.read_text() == job["csv"]


def test_list_inputs_keeps_input_order_and_drops_repeats(tmp_path):
    for name in ("b.png", "a.png", "c.jpg", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "z.png").write_bytes(b"x")
    listed = list_inputs([tmp_path / "c.jpg", tmp_path, str(tmp_path / "*.png")])
    assert listed == [str(tmp_path / n) for n in ("c.jpg", "a.png", "b.png")]
    assert list_inputs(tmp_path, recursive=True)[-1] == str(tmp_path / "sub" / "z.png")
    with pytest.raises(FileNotFoundError, match="no file matches"):
        list_inputs(str(tmp_path / "*.bmp"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_inputs(tmp_path / "missing.png")


def test_image_paths_follow_pathlib_order_on_a_random_tree(tmp_path):
    """The lean listing (strings, one folder at a time) must keep `image_files`' order, which
    compares paths component by component ("a/b/c.png" before "a/b-c.png")."""
    from simplenet_fast.preprocess import image_files, image_paths

    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    rng = random.Random(seed)
    names = ["a", "b", "b-c", "b.d", "B", "a b", "z", "\u00e4", "b0"]
    (tmp_path / "b.png").write_bytes(b"x")
    for _ in range(80):
        folder = tmp_path.joinpath(*(rng.choice(names) for _ in range(rng.randint(0, 3))))
        if folder.exists() and not folder.is_dir():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        file = folder / (rng.choice(names) + rng.choice([".png", ".PNG", ".txt"]))
        if not file.exists():
            file.write_bytes(b"x")
    for recursive in (False, True):
        listed = image_paths(tmp_path, recursive=recursive)
        assert listed == [str(p) for p in image_files(tmp_path, recursive=recursive)]
        assert all(isinstance(p, str) for p in listed)


def test_heatmap_names_are_unique_and_do_not_depend_on_order():
    paths = ["a/x.png", "b/x.png", "b/y.png", "c/x.jpg"]
    names = list(heatmap_names(paths))
    assert names[2] == "y.png" and len(set(names)) == 4
    assert all(n.startswith("x_") and len(n) == len("x_") + 12 + 4 for n in names[:2] + names[3:])
    assert list(heatmap_names(paths[::-1])) == names[::-1]


def test_row_lines_reject_every_kind_of_damage():
    row = {"i": 3, "path": "a\nb,\"c\".png", "score": "0.25", "label": "normal",
           "normalized_score": "", "heatmap": "", "error": ""}
    line = _encode(row)
    assert line.count(b"\n") == 1 and _decode(line) == row
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    for cut in range(len(line) - 1):  # cut short anywhere: no newline at the end
        assert _decode(line[:cut]) is None
    for _ in range(50):  # one byte changed anywhere before the newline
        k = rng.randrange(len(line) - 1)
        damaged = line[:k] + bytes([line[k] ^ (1 + rng.randrange(255))]) + line[k + 1:]
        assert _decode(damaged) is None
    for bad in ({**row, "score": "nan"}, {**row, "score": "x"}, {**row, "i": -1},
                {**row, "label": "maybe"}, {**row, "error": "boom"}, {"i": 1}):
        assert _decode(_encode(bad)) is None


# ---------------------------------------------------------------------------------- resume
def _interrupted_state(job, out: Path, keep: int, fake_score: str) -> list[dict]:
    """The work folder an interrupted run leaves: the first `keep` rows (one with a score that
    no model gives, to prove it is kept and not recomputed), an unreadable image's error row, a
    line whose checksum no longer matches, and a last line cut short."""
    rows = _rows(job["csv"])
    work = _work(out)
    work.mkdir()
    model = SimpleNet.load(job["model"])
    (work / "job.json").write_text(json.dumps({"version": 1, "fingerprint": _fingerprint(model),
                                               "columns": list(rows[0])}))
    lines = []
    for i, r in enumerate(rows[:keep]):
        lines.append(_encode({"i": i, "path": r["path"], "score": r["score"], "label": r["label"],
                              "normalized_score": r["normalized_score"], "heatmap": "",
                              "error": ""}))
    lines[1] = _encode({**_decode(lines[1]), "score": fake_score})
    lines[2] = lines[2].replace(b'"score":"', b'"score":"9')  # checksum mismatch
    lines.append(_encode({"i": keep, "path": str(job["images"] / "im017b.png"), "score": "",
                          "label": "", "normalized_score": "", "heatmap": "",
                          "error": "was unreadable"}))
    cut = _encode({"i": keep + 1, "path": rows[keep]["path"], "score": rows[keep]["score"],
                   "label": "", "normalized_score": "", "heatmap": "", "error": ""})
    (work / "rank-0ld-0.jsonl").write_bytes(b"".join(lines) + cut[:len(cut) // 2])
    return rows


def test_resume_keeps_good_rows_and_redoes_damaged_ones(job, tmp_path):
    out = tmp_path / "s.csv"
    keep = 12
    rows = _interrupted_state(job, out, keep, fake_score="1234.5")
    with pytest.warns(UserWarning, match="2 damaged line"):
        summary = score_files(str(job["model"]), job["images"], out, resume=True, batch_size=4)
    assert summary.dropped_lines == 2  # the checksum mismatch and the cut-short line
    assert summary.resumed == keep - 1 and summary.scored == N_IMAGES and summary.errors == 1
    got = _rows(out.read_text())
    assert got[1]["score"] == "1234.5"  # kept, not recomputed
    got[1]["score"] = rows[1]["score"]
    assert got == rows  # everything else as in one uninterrupted run
    assert not _work(out).exists()


def test_resume_after_a_complete_run_scores_only_new_images(job, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for p in sorted(job["images"].glob("im00*.png")):
        (folder / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "s.csv"
    first = score_files(str(job["model"]), folder, out)
    assert first.scored == 10
    text = out.read_text().replace(_rows(out.read_text())[0]["score"], "777.0", 1)
    out.write_text(text)  # a mark that shows the row is kept
    for p in sorted(job["images"].glob("im01*.png")):
        (folder / p.name).write_bytes(p.read_bytes())
    second = score_files(str(job["model"]), folder, out, resume=True)
    assert (second.resumed, second.scored, second.errors) == (10, 20, 1)
    got = _rows(out.read_text())
    assert got[0]["score"] == "777.0"
    assert [r["path"] for r in got] == sorted(str(p) for p in folder.glob("im0??.png"))


def test_resume_refuses_partial_results_of_another_model(job, tmp_path):
    out = tmp_path / "s.csv"
    _interrupted_state(job, out, 5, fake_score="1.0")
    other = tmp_path / "other.pt"
    _tiny_model(seed=1).save(other)
    with pytest.raises(ValueError, match="another model"):
        score_files(str(other), job["images"], out, resume=True)
    # Without --resume the earlier results are discarded, with a warning, and all is redone.
    with pytest.warns(UserWarning, match="discarding the partial results"):
        score_files(str(job["model"]), job["images"], out, batch_size=8)
    assert out.read_text() == job["csv"]


def test_resume_redoes_images_whose_overlay_is_missing(job, tmp_path):
    out, heat = tmp_path / "s.csv", tmp_path / "heat"
    score_files(str(job["model"]), job["images"], out, heatmaps=heat)
    rows = _rows(out.read_text())
    assert [Path(r["heatmap"]).name for r in rows] == [Path(r["path"]).name for r in rows]
    lost = Path(rows[5]["heatmap"])
    lost.unlink()
    summary = score_files(str(job["model"]), job["images"], out, heatmaps=heat, resume=True)
    assert summary.resumed == N_IMAGES - 1 and lost.is_file()
    assert _rows(out.read_text()) == rows


# ---------------------------------------------------------------------------------- processes
def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _kill_at_random_point(command: list[str], work: Path, rng: random.Random) -> int:
    """Start `command`, SIGKILL it and every process it started once its parts hold a random
    number of rows; returns that number (0: the job finished first)."""
    target = rng.randrange(1, N_IMAGES)
    process = subprocess.Popen(command, **_proc(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while process.poll() is None and time.monotonic() < deadline:
            rows = sum(p.read_bytes().count(b"\n") for p in work.glob("rank-*.jsonl")) \
                if work.is_dir() else 0
            if rows >= target:
                for pid in _descendants(process.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                process.wait()
                return rows
            time.sleep(0.005)
        assert process.poll() is not None, "the job did not finish in 240 s"
        assert process.returncode == 0, process.stderr.read()
        return 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _torchrun(n: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(n), "-m", "simplenet_fast", *args]


def _score_args(job, out: Path, *extra: str) -> list[str]:
    return ["score", str(job["model"]), str(job["images"]), "--csv", str(out), "--quiet",
            "--batch-size", "2", *extra]


def test_child_processes_import_the_package_under_test():
    """Otherwise a child may import another copy (the source tree of a clone, without the compiled
    extension) and the bit-for-bit comparisons below would test the wrong thing."""
    child = subprocess.run(
        [sys.executable, "-c", "import simplenet_fast, simplenet_fast._native as n; "
         "print(simplenet_fast.__file__); print(n.native() is not None)"],
        **_proc(), capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert Path(child[0]) == Path(simplenet_fast.__file__).resolve()
    from simplenet_fast._native import native
    assert child[1] == str(native() is not None)


def _check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    # Both ends of stderr: torchrun's summary at the end can push a rank's own error out of view.
    err = result.stderr
    assert result.returncode == 0, err if len(err) <= 6000 else f"{err[:3000]}\n...\n{err[-3000:]}"
    return result


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_sigkill_at_a_random_point_then_resume_loses_nothing(job, tmp_path, processes):
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    rng = random.Random(seed)
    out = tmp_path / "s.csv"
    if processes == 1:
        command = [sys.executable, "-m", "simplenet_fast", *_score_args(job, out)]
    else:
        command = _torchrun(2, *_score_args(job, out))
    killed_at = _kill_at_random_point(command, _work(out), rng)
    if killed_at and out.exists():
        # The kill landed between the CSV's rename and the removal of the parts (a busy machine
        # makes that window reachable): the CSV may exist then, but only whole, never partial.
        assert out.read_text() == job["csv"]
    _check(subprocess.run(command + ["--resume"], **_proc(), capture_output=True, text=True,
                          timeout=240))
    assert out.read_text() == job["csv"]  # every image exactly once, the same bits
    assert not _work(out).exists()


@pytest.mark.slow
def test_torchrun_two_processes_give_the_one_process_csv_and_heatmaps(job, tmp_path):
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    errors = tmp_path / "errors.csv"
    _check(subprocess.run([sys.executable, "-m", "simplenet_fast",
                           *_score_args(job, one, "--heatmaps", str(tmp_path / "h1"))],
                          **_proc(threads=2), capture_output=True, text=True, timeout=240))
    result = _check(subprocess.run(
        _torchrun(2, *_score_args(job, two, "--heatmaps", str(tmp_path / "h2"), "--errors",
                                  str(errors))), **_proc(), capture_output=True, text=True,
        timeout=240))
    assert "2 processes" in result.stdout and result.stdout.count("wrote") == 2  # rank 0 only
    assert one.read_text().replace("/h1/", "/h2/") == two.read_text()
    assert errors.read_text() == job["errors"]
    pngs = sorted(p.name for p in (tmp_path / "h1").iterdir())
    assert len(pngs) == N_IMAGES and pngs == sorted(p.name for p in (tmp_path / "h2").iterdir())
    for name in pngs:
        assert (tmp_path / "h1" / name).read_bytes() == (tmp_path / "h2" / name).read_bytes()


_DYING_WORKER = '''
import os, sys
from simplenet_fast import SimpleNet
from simplenet_fast.distributed import JobError, score_files

model_path, images, out, marker = sys.argv[1:5]
model = SimpleNet.load(model_path)
if os.environ.get("RANK") == "1" and not os.path.exists(marker):
    score, calls = model.score, [0]
    def dying(*args, **kwargs):  # rank 1 dies in its third batch, the first time only
        calls[0] += 1
        if calls[0] == 3:
            open(marker, "w").close()
            os._exit(7)
        return score(*args, **kwargs)
    model.score = dying
try:
    score_files(model, images, out, resume=True, batch_size=2, timeout_s=120)
except JobError as error:
    print(f"JobError: {error}", file=sys.stderr)
    sys.exit(1)
'''


@pytest.mark.slow
def test_a_dying_rank_fails_the_job_at_once_without_a_csv_and_resume_completes_it(job, tmp_path):
    """Processes started by hand (no torchrun agent to clean up): rank 1 dies mid-job; rank 0
    must exit non-zero with a clear message, promptly, and leave no CSV."""
    script = tmp_path / "worker.py"
    script.write_text(_DYING_WORKER)
    out, marker = tmp_path / "s.csv", tmp_path / "died"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workers = []
    for rank in range(2):
        proc = _proc(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        workers.append(subprocess.Popen(
            [sys.executable, str(script), str(job["model"]), str(job["images"]), str(out),
             str(marker)], **proc, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    start = time.monotonic()
    results = [w.communicate(timeout=240) for w in workers]
    assert time.monotonic() - start < 100  # far below the 120 s timeout: noticed at once
    assert marker.exists() and workers[1].returncode == 7
    assert workers[0].returncode == 1, results[0][1]
    assert "another rank stopped" in results[0][1] and "--resume" in results[0][1]
    assert not out.exists()
    # The same command again (resume=True) finishes the job: rank 1 no longer dies.
    _check(subprocess.run([sys.executable, str(script), str(job["model"]), str(job["images"]),
                           str(out), str(marker)], **_proc(), capture_output=True, text=True,
                          timeout=240))
    assert out.read_text() == job["csv"]


_LET_GO_WORKER = """
import sys, weakref
import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d
from simplenet_fast import distributed as d

handed = []  # weak references to every tensor given to a collective


def recording(call):
    def collective(*args, **kwargs):
        for arg in (*args, *kwargs.values()):
            for t in arg if isinstance(arg, list) else [arg]:
                if isinstance(t, torch.Tensor):
                    handed.append(weakref.ref(t))
        return call(*args, **kwargs)
    return collective


for name in ("broadcast", "all_gather", "gather"):  # torch's object helpers call these too
    wrapped = recording(getattr(distributed_c10d, name))
    setattr(distributed_c10d, name, wrapped)
    setattr(dist, name, wrapped)

held = 0
with d.session(timeout_s=60) as world:
    for i in range(int(sys.argv[1])):
        value = {"i": i, "blob": bytes(range(256)) * (i + 1)}
        assert d._broadcast(world, value if world.is_main else None, "b") == value
        assert d._all_gather(world, (i, world.rank), "g") == [(i, 0), (i, 1)]
        got = d.gather_in_order(world, [f"{world.rank}-{i}", f"{world.rank}-{i}b"])
        assert got == ([f"0-{i}", f"1-{i}", f"0-{i}b", f"1-{i}b"] if world.is_main else None), got
        held += sum(r() is not None for r in handed)
        handed.clear()
print(f"tensors still held after the call: {held}")
"""


@pytest.mark.slow
def test_control_messages_return_only_once_the_process_group_let_go_of_their_tensors(tmp_path):
    """Else gloo's worker thread frees their Python objects later, and a process that is shutting
    down by then aborts: 'terminate called without an active exception' (pytorch/pytorch#179291;
    rank 0 of a completed job, in one run of the SIGKILL test in 40-70 on a loaded machine)."""
    script = tmp_path / "worker.py"
    script.write_text(_LET_GO_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workers = [subprocess.Popen(
        [sys.executable, str(script), "100"], **_proc(
            RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    results = [w.communicate(timeout=240) for w in workers]
    for worker, (out, err) in zip(workers, results):
        assert worker.returncode == 0, err
        assert "tensors still held after the call: 0" in out, out


@pytest.mark.slow
def test_torchrun_elastic_restart_resumes_after_a_rank_dies(job, tmp_path):
    """As the README says to run restarts: with torchrun's store not shared with the workers
    (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1). With it shared, restarted workers here failed to
    connect, hung or aborted in about one run in three (pytorch/pytorch#135712)."""
    script = tmp_path / "worker.py"
    script.write_text(_DYING_WORKER)
    out, marker = tmp_path / "s.csv", tmp_path / "died"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "--max-restarts", "1", str(script), str(job["model"]),
               str(job["images"]), str(out), str(marker)]
    proc = _proc(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    _check(subprocess.run(command, **proc, capture_output=True, text=True, timeout=240))
    assert marker.exists() and out.read_text() == job["csv"]
    # Without a restart to fall back on, the job fails as a whole and writes no CSV.
    out.unlink()
    marker.unlink()
    command[command.index("--max-restarts") + 1] = "0"
    result = subprocess.run(command, **proc, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0 and marker.exists() and not out.exists()


@pytest.mark.slow
def test_torchrun_eval_gives_the_one_process_metrics(job, tmp_path):
    from test_cli import mvtec_category

    category = mvtec_category(tmp_path / "cat", seed=4)
    args = ["eval", str(category), "--model", str(job["model"]), "--quiet", "--score-batch-size",
            "2"]
    one = _check(subprocess.run([sys.executable, "-m", "simplenet_fast", *args, "--csv",
                                 str(tmp_path / "one.csv")], **_proc(threads=2),
                                capture_output=True, text=True, timeout=240))
    two = _check(subprocess.run(_torchrun(2, *args, "--csv", str(tmp_path / "two.csv")),
                                **_proc(), capture_output=True, text=True, timeout=240))
    assert two.stdout.count("image AUROC") == 1  # one table, from rank 0
    (a,), (b,) = _rows((tmp_path / "one.csv").read_text()), _rows((tmp_path / "two.csv").read_text())
    assert a["pixel_auroc"] != ""  # masks exist: the maps were gathered too
    for key in ("dataset", "n_test", "image_auroc", "pixel_auroc", "aupro"):
        assert a[key] == b[key], key
    assert one.returncode == two.returncode == 0


@pytest.mark.slow
def test_peak_memory_of_a_job_does_not_follow_the_number_of_images(tmp_path):
    """Fresh interpreters (bench/bench_scale.py): 20x more images add no more than the listing of
    their paths; holding each image's crop or map (>= 7 KB each here) would add > 25 MiB."""
    import importlib.util

    bench = Path(__file__).resolve().parent.parent / "bench" / "bench_scale.py"
    spec = importlib.util.spec_from_file_location("bench_scale", bench)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    few, many = bench.memory_table(tmp_path, [200, 4000], batch_size=16)
    print(json.dumps({"few": few, "many": many}))
    assert many["peak_added_mib"] < few["peak_added_mib"] + 8, (few, many)


def test_other_commands_refuse_to_run_under_torchrun(monkeypatch, capsys):
    from simplenet_fast.cli import EXIT_ERROR, main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["export", "m.pt", "--onnx", "m.onnx"]) == EXIT_ERROR
    assert "[rank 1] export runs in one process" in capsys.readouterr().err


def test_job_error_names_the_rank():
    from simplenet_fast.distributed import World

    assert str(World(rank=1, size=3).fail("boom")) == "rank 1 of 3: boom"
    assert isinstance(World().fail("x"), JobError)


@pytest.mark.parametrize("shared, restarts, rank, warns", [
    ("True", "3", "0", True), ("True", "3", "1", False), ("True", "0", "0", False),
    ("False", "3", "0", False)])
def test_rank_0_warns_when_restarted_workers_would_share_torchruns_store(
        monkeypatch, shared, restarts, rank, warns):
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", shared)
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", restarts)
    monkeypatch.setenv("RANK", rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distributed._warn_if_restarts_share_the_store()
    assert [("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in str(w.message)) for w in caught] == (
        [True] if warns else [])
