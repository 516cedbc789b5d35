"""Black-box teacher: exact spend, budget stops before any query, memo, crash accounting, command protocol."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill.blackbox import BlackBoxQueryError, BlackBoxTeacher, BudgetExceededError, LedgerError
from distill.blackbox_ledger import LEDGER_FORMAT

FIXTURE = Path(__file__).with_name("blackbox_fixture.py")
DIM = 8


def target(function: str) -> str:
    return f"{FIXTURE}:{function}"


def reference(kind: str, items: list) -> np.ndarray:
    """The fixture teacher's raw answer, computed here independently of the query path."""
    from distill.blackbox import load_query_function

    return load_query_function(target("reference"))(kind, items)


@pytest.fixture
def calls(tmp_path, monkeypatch):
    """Reads the provider's query log: a list of (kind, count), one per query received."""
    log = tmp_path / "provider.log"
    monkeypatch.setenv("BLACKBOX_FIXTURE_LOG", str(log))

    def read() -> list[tuple[str, int]]:
        if not log.exists():
            return []
        return [(e["kind"], e["count"]) for e in map(json.loads, log.read_text().splitlines())]

    return read


def images(n: int, offset: int = 0) -> list[Image.Image]:
    return [Image.new("RGB", (4, 4), (10 * (i + offset) % 256, 7, 200)) for i in range(n)]


def texts(n: int, offset: int = 0) -> list[str]:
    return [f"caption number {i + offset}" for i in range(n)]


def teacher(tmp_path, function: str = "embed", **kwargs) -> BlackBoxTeacher:
    kwargs.setdefault("ledger", str(tmp_path / "spend.json"))
    return BlackBoxTeacher(embed_dim=DIM, name="fixture-clip", version="1", query=target(function), **kwargs)


def expected(kind: str, items: list) -> torch.Tensor:
    raw = reference(kind, items)
    return torch.from_numpy(raw / np.linalg.norm(raw, axis=1, keepdims=True)).float()


def test_encodings_are_normalised_float32_and_match_the_teacher(tmp_path, calls):
    bb = teacher(tmp_path, max_batch=3)
    out_i, out_t = bb.encode_images(images(5)), bb.encode_texts(texts(4))
    assert out_i.dtype == torch.float32 and out_i.shape == (5, DIM) and out_t.shape == (4, DIM)
    torch.testing.assert_close(out_i.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(out_i, expected("image", images(5)))
    torch.testing.assert_close(out_t, expected("text", texts(4)))
    assert calls() == [("image", 3), ("image", 2), ("text", 3), ("text", 1)]  # max_batch respected
    assert bb.encode_texts([]).shape == (0, DIM)


def test_spend_is_exact_and_weighted(tmp_path, calls):
    bb = teacher(tmp_path, max_batch=4, cost_per_image=2.5, cost_per_text=1)
    bb.encode_images(images(6))
    bb.encode_texts(texts(3))
    spend = bb.spend()
    assert spend.units == 6 * 2.5 + 3 and spend.items == {"image": 6, "text": 3} and spend.calls == 3
    assert spend.not_received_units == 0
    state = json.loads((tmp_path / "spend.json").read_text())
    assert state["format"] == LEDGER_FORMAT and state["spent_units"] == 18.0 and state["calls"] == 3
    assert [(e["kind"], e["count"], e["units"], e["status"]) for e in state["history"]] == [
        ("image", 4, 10.0, "ok"),
        ("image", 2, 5.0, "ok"),
        ("text", 3, 3.0, "ok"),
    ]
    # A new process (a new teacher on the same ledger) continues the count.
    teacher(tmp_path, cost_per_image=2.5).encode_texts(texts(2, offset=100))
    assert teacher(tmp_path).spend().units == 20.0
    assert "spent 20 units (6 images, 5 texts) in 4 queries" in bb.spend_report()


def test_repeated_items_cost_nothing(tmp_path, calls):
    bb = teacher(tmp_path)
    first = bb.encode_texts(["a", "b", "a", "c", "b"])  # duplicates within one call: queried once
    assert calls() == [("text", 3)]
    again = bb.encode_texts(["c", "a", "b"])  # all in memory: no query
    assert calls() == [("text", 3)] and bb.spend().units == 3
    torch.testing.assert_close(again, first[[3, 0, 1]])
    # Same pixels in a new object hit the memo too; a different picture does not.
    bb.encode_images(images(2))
    bb.encode_images(images(2) + images(1, offset=9))
    assert calls()[1:] == [("image", 2), ("image", 1)] and bb.spend().units == 6


def test_memo_off_and_capacity(tmp_path, calls):
    bb = teacher(tmp_path, memo_items=0)
    bb.encode_texts(["x", "x"])
    bb.encode_texts(["x"])
    assert calls() == [("text", 1), ("text", 1)]
    small = teacher(tmp_path, memo_items=2)
    small.encode_texts(["p", "q", "r"])  # "p" drops out of the memory
    small.encode_texts(["q", "r", "p"])
    assert calls()[2:] == [("text", 3), ("text", 1)]


def test_over_budget_plan_fails_before_any_query(tmp_path, calls):
    bb = teacher(tmp_path, budget=10, cost_per_text=0.5)
    bb.encode_images(images(4))
    with pytest.raises(BudgetExceededError) as err:
        bb.plan(num_images=5, num_texts=4)
    message = str(err.value)
    for part in ("needs 7 units", "budget is 10", "4 are already spent", "6 units left fit 6 images or 12 texts"):
        assert part in message, message
    assert calls() == [("image", 4)]
    bb.plan(num_images=6, num_texts=0)  # exactly the budget: allowed
    bb.plan(num_images=2, num_texts=8)


def test_query_over_budget_sends_nothing(tmp_path, calls):
    bb = teacher(tmp_path, budget=5, max_batch=2)
    with pytest.raises(BudgetExceededError, match="encoding 6 new texts needs 6 units"):
        bb.encode_texts(texts(6))
    assert calls() == [] and bb.spend().calls == 0
    bb.encode_texts(texts(5))
    with pytest.raises(BudgetExceededError):
        bb.encode_texts(texts(1, offset=50))
    assert sum(n for _, n in calls()) == 5
    bb.encode_texts(texts(5))  # repeats are free even with the budget spent


def test_each_query_rechecks_the_shared_ledger(tmp_path, calls):
    """Another process spends between the plan and the query: the query is refused, not sent."""
    bb, other = teacher(tmp_path, budget=6), teacher(tmp_path, budget=6)
    bb.plan(0, 4)
    other.encode_texts(texts(3, offset=10))
    with pytest.raises(BudgetExceededError, match="3 are already spent"):
        bb.encode_texts(texts(4))
    assert calls() == [("text", 3)]


def test_query_inside_a_call_is_refused_when_others_spent_meanwhile(tmp_path, calls):
    """The defence in depth: the budget is checked again under the ledger lock before each query."""
    bb, other = teacher(tmp_path, budget=6, max_batch=2), teacher(tmp_path, budget=6)
    provider = bb._function

    def provider_while_another_process_spends(kind, items):
        if len(calls()) == 0:
            other.encode_texts(texts(3, offset=10))  # logged after this query: the provider saw it first
        return provider(kind, items)

    bb._function = provider_while_another_process_spends
    with pytest.raises(BudgetExceededError, match="a query of 2 texts needs 2 units .* 5 are already spent"):
        bb.encode_texts(texts(4))  # 4 <= 6 when the call starts; the 2nd batch would reach 7
    assert calls() == [("text", 3), ("text", 2)] and bb.spend().units == 5


def test_processes_sharing_a_ledger_never_lose_spend_or_overshoot(tmp_path, calls):
    """Two processes query one by one against one ledger and budget: together they stop exactly at it."""
    script = textwrap.dedent(f"""
        import sys
        from distill.blackbox import BlackBoxTeacher, BudgetExceededError
        bb = BlackBoxTeacher(embed_dim={DIM}, name="fixture-clip", version="1", query={target("embed")!r},
                             ledger={str(tmp_path / "spend.json")!r}, budget=30)
        try:
            for i in range(20):
                bb.encode_texts([sys.argv[1] + str(i)])
        except BudgetExceededError:
            sys.exit(5)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, tag]) for tag in ("a", "b")]
    codes = sorted(p.wait(timeout=120) for p in procs)
    assert codes == [0, 5] or codes == [5, 5]
    spend = teacher(tmp_path).spend()
    assert spend.units == 30 and spend.calls == 30 and spend.not_received_units == 0
    assert len(calls()) == 30


def test_budget_needs_a_ledger_file_and_attach_ledger(tmp_path, calls):
    bb = teacher(tmp_path, budget=3, ledger=None)
    with pytest.raises(ValueError, match="needs a spend ledger file"):
        bb.plan(1, 0)
    assert bb.attach_ledger(tmp_path / "cache" / "spend.json") == tmp_path / "cache" / "spend.json"
    bb.encode_texts(texts(2))
    assert json.loads((tmp_path / "cache" / "spend.json").read_text())["spent_units"] == 2
    free = teacher(tmp_path, ledger=None)  # no budget: counted in memory
    free.encode_texts(texts(1))
    assert free.spend().units == 1
    with pytest.raises(RuntimeError, match="before the first query"):
        free.attach_ledger(tmp_path / "late.json")


def test_failed_query_counts_as_spent_not_received(tmp_path, calls):
    bb = teacher(tmp_path, "embed_raises", max_batch=4)
    with pytest.raises(BlackBoxQueryError, match=r"embed_raises raised on a batch of 4 images: ConnectionError"):
        bb.encode_images(images(6))
    spend = teacher(tmp_path).spend()
    assert calls() == [("image", 4)]
    assert spend.units == 4 and spend.not_received_units == 4 and spend.not_received_items["image"] == 4
    assert teacher(tmp_path).spend_report().count("4 units (4 images, 0 texts) queried but not received") == 1
    assert json.loads((tmp_path / "spend.json").read_text())["history"][0]["status"] == "failed"


def test_crash_mid_query_leaves_pending_spend(tmp_path, calls):
    """The process dies inside the query: the write-ahead entry makes the spend exact after reload."""
    ledger = tmp_path / "spend.json"
    script = textwrap.dedent(f"""
        from distill.blackbox import BlackBoxTeacher
        kw = dict(embed_dim={DIM}, name="fixture-clip", version="1", ledger={str(ledger)!r}, budget=100, max_batch=3)
        BlackBoxTeacher(query={target("embed")!r}, **kw).encode_texts(["a", "b", "c"])
        BlackBoxTeacher(query={target("embed_exits")!r}, **kw).encode_texts(["d", "e", "f", "g"])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 17, done.stderr
    assert calls() == [("text", 3), ("text", 3)]  # the provider received (and charged) both queries
    spend = teacher(tmp_path).spend()
    assert spend.units == 6 and spend.items["text"] == 6 and spend.calls == 2
    assert spend.not_received_units == 3 and spend.pending_calls == 1
    report = teacher(tmp_path, budget=100).spend_report()
    assert "3 units (0 images, 3 texts) queried but not received (1 query(ies) still pending: lost in a crash" in report
    with pytest.raises(BudgetExceededError, match="of which 3 queried but not received"):
        teacher(tmp_path, budget=8).plan(0, 3)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid JSON"),
        ('{"format": "something-else", "history": []}', "not a spend ledger"),
        ('{"format": "' + LEDGER_FORMAT + '"}', "no 'history' list"),
        (
            '{"format": "' + LEDGER_FORMAT + '", "spent_units": 0, "items": {"image": 0, "text": 0}, "calls": 0,'
            ' "history": [{"id": "1", "kind": "text", "count": 2, "units": 2.0, "status": "ok"}]}',
            "disagree with its history",
        ),
        ('{"format": "' + LEDGER_FORMAT + '", "history": [{"id": "1", "kind": "audio"}]}', "history entry 0"),
    ],
)
def test_corrupt_ledger_is_a_clear_error(tmp_path, calls, content, match):
    (tmp_path / "spend.json").write_text(content)
    with pytest.raises(LedgerError, match=match) as err:
        teacher(tmp_path)
    assert str(tmp_path / "spend.json") in str(err.value)
    assert calls() == []


def test_ledger_write_is_atomic(tmp_path, calls, monkeypatch):
    """A write that fails half-way leaves the previous complete ledger (and no stray temp file)."""
    import distill.files

    bb = teacher(tmp_path)
    bb.encode_texts(texts(2))
    before = (tmp_path / "spend.json").read_text()

    def broken_dumps(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(distill.files.json, "dumps", broken_dumps)
    with pytest.raises(OSError, match="disk full"):
        bb.encode_texts(texts(1, offset=7))
    monkeypatch.undo()
    assert (tmp_path / "spend.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["provider.log", "spend.json", "spend.json.lock"]
    assert calls() == [("text", 2)]  # the pending record failed, so the query was never sent


@pytest.mark.parametrize(
    ("function", "match"),
    [
        ("embed_wrong_width", r"returned shape \(3, 9\), expected \(3, 8\)"),
        ("embed_one_short", r"returned shape \(2, 8\), expected \(3, 8\)"),
        ("embed_nan", r"non-finite values \(NaN/inf\) in rows \[2\]"),
    ],
)
def test_bad_answers_are_errors_and_still_spent(tmp_path, calls, function, match):
    bb = teacher(tmp_path, function)
    with pytest.raises(BlackBoxQueryError, match=match) as err:
        bb.encode_texts(texts(3))
    assert f"{FIXTURE}:{function} on a batch of 3 texts" in str(err.value)
    assert bb.spend().not_received_units == 3


def test_array_like_answers(tmp_path, calls):
    torch.testing.assert_close(teacher(tmp_path, "embed_lists").encode_texts(texts(2)), expected("text", texts(2)))


def command_teacher(tmp_path, **kwargs) -> BlackBoxTeacher:
    return BlackBoxTeacher(
        embed_dim=DIM,
        name="fixture-clip",
        version="1",
        command=[sys.executable, str(FIXTURE)],
        ledger=str(tmp_path / "spend.json"),
        **kwargs,
    )


def test_command_protocol_round_trip(tmp_path, calls):
    bb = command_teacher(tmp_path, max_batch=4)
    imgs = [*images(5), Image.new("L", (3, 5), 77)]
    torch.testing.assert_close(bb.encode_images(imgs), expected("image", imgs))
    torch.testing.assert_close(bb.encode_texts(texts(3)), expected("text", texts(3)))
    assert calls() == [("image", 4), ("image", 2), ("text", 3)] and bb.spend().units == 9


@pytest.mark.parametrize(
    ("mode", "match"),
    [
        ("fail", r"on a batch of 2 texts exited 3; stderr: quota exceeded at provider"),
        ("silent", "exited 0 but wrote no embeddings.npy"),
        ("short", r"returned shape \(1, 8\), expected \(2, 8\)"),
        ("nan", r"non-finite values \(NaN/inf\) in rows \[0\]"),
    ],
)
def test_command_errors(tmp_path, calls, monkeypatch, mode, match):
    monkeypatch.setenv("BLACKBOX_FIXTURE_MODE", mode)
    bb = command_teacher(tmp_path)
    with pytest.raises(BlackBoxQueryError, match=match) as err:
        bb.encode_texts(texts(2))
    assert "black-box command" in str(err.value) and calls() == [("text", 2)]
    assert bb.spend().units == 2 and bb.spend().not_received_units == 2


def test_fingerprint_is_identity(tmp_path):
    base = teacher(tmp_path).fingerprint()
    assert base == {
        "type": "blackbox",
        "name": "fixture-clip",
        "version": "1",
        "embed_dim": DIM,
        "query": target("embed"),
    }
    json.dumps(base)
    assert teacher(tmp_path, budget=3, max_batch=2, logit_scale=50).fingerprint() == base  # spend settings: same model
    renamed = BlackBoxTeacher(embed_dim=DIM, name="other", version="1", query=target("embed")).fingerprint()
    bumped = BlackBoxTeacher(embed_dim=DIM, name="fixture-clip", version="2", query=target("embed")).fingerprint()
    assert len({json.dumps(f, sort_keys=True) for f in (base, renamed, bumped)}) == 3
    assert command_teacher(tmp_path).fingerprint()["command"] == [sys.executable, str(FIXTURE)]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of query"),
        ({"query": "no_colon_here"}, "must be 'package.module:function'"),
        ({"query": "/nowhere/at/all.py:embed"}, "does not exist"),
        ({"query": "json:no_such_function"}, "json has no function 'no_such_function'"),
        ({"query": "no_such_package_xyz:f"}, "cannot import 'no_such_package_xyz'"),
        ({"command": ["no-such-program-xyz"]}, "not found"),
        ({"query": "json:dumps", "command": ["ls"]}, "exactly one of query"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlackBoxTeacher(embed_dim=DIM, name="n", version="1", **kwargs)


def test_configured_by_jsonargparse(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--teacher", type=BlackBoxTeacher)
    args = [
        "--teacher.class_path=distill.blackbox.BlackBoxTeacher",
        f"--teacher.init_args.embed_dim={DIM}",
        "--teacher.init_args.name=fixture-clip",
        "--teacher.init_args.version=1",
        f"--teacher.init_args.command=[{sys.executable}, {FIXTURE}]",
        "--teacher.init_args.budget=10",
    ]
    bb = parser.instantiate_classes(parser.parse_args(args)).teacher
    assert isinstance(bb, BlackBoxTeacher) and bb.command == [sys.executable, str(FIXTURE)] and bb.budget == 10
