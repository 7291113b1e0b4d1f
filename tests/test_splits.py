"""User splits on synthetic embeddings: exact sizes, disjointness, determinism, and what makes OOD different."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tailor.data import DataError, HistoryItem, User
from tailor.data.lamp import load_users
from tailor.data.splits import ood_split, random_split, subset, swap_histories
from tailor.tasks import get_task
from tailor.tasks.records import Query


def _users(n: int) -> list[User]:
    item = HistoryItem("0", {"text": "t", "score": "5"})
    return [User(id=str(i), task="LaMP-3", profile=(item,)) for i in range(n)]


def _blobs(sizes: list[int], dim: int = 12, spread: float = 0.08, seed: int = 0) -> np.ndarray:
    """One tight blob per size, each around its own orthogonal direction (so they stay apart after L2-norm)."""
    rng = np.random.default_rng(seed)
    rows = [np.eye(dim)[b] + spread * rng.standard_normal((size, dim)) for b, size in enumerate(sizes)]
    return np.vstack(rows)


def _population(seed: int = 0) -> tuple[list[User], np.ndarray, set[str]]:
    """Four nearby big groups and one small group far from all of them; returns its user ids too."""
    rng = np.random.default_rng(seed)
    dim = 12
    base = np.ones(dim) / np.sqrt(dim)
    near = [base + 0.35 * np.eye(dim)[b] for b in range(4)]
    far = -base + 0.5 * np.eye(dim)[11]
    centres = [*near, far]
    sizes = [70, 70, 70, 70, 15]
    points = np.vstack([c + 0.05 * rng.standard_normal((s, dim)) for c, s in zip(centres, sizes)])
    users = _users(len(points))
    return users, points, {u.id for u in users[-15:]}


def _mean_distance_to_train(users: list[User], points: np.ndarray, train: list[User], test: list[User]) -> float:
    unit = points / np.linalg.norm(points, axis=1, keepdims=True)
    index = {u.id: i for i, u in enumerate(users)}
    centroid = unit[[index[u.id] for u in train]].mean(axis=0)
    return float(np.linalg.norm(unit[[index[u.id] for u in test]] - centroid, axis=1).mean())


# --- subset ------------------------------------------------------------------------------------------------------

def test_subset_is_seeded_and_keeps_order() -> None:
    users = _users(50)
    picked = subset(users, 10, seed=3)
    assert len(picked) == 10 and picked == subset(users, 10, seed=3)
    assert [int(u.id) for u in picked] == sorted(int(u.id) for u in picked)
    assert picked != subset(users, 10, seed=4)
    assert subset(users, None, 0) == users and subset(users, 80, 0) == users
    with pytest.raises(ValueError):
        subset(users, -1, 0)


# --- random split -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "test_size", "expected"), [(300, None, 60), (1200, None, 200), (300, 37, 37)])
def test_random_split_sizes_exact_and_disjoint(n: int, test_size: int | None, expected: int) -> None:
    users = _users(n)
    points = _blobs([n // 3, n // 3, n - 2 * (n // 3)])
    train, test = random_split(users, points, test_size=test_size, seed=1)
    assert len(test) == expected and len(train) == n - expected
    assert {u.id for u in train}.isdisjoint(u.id for u in test)
    assert sorted(train + test, key=lambda u: int(u.id)) == users
    assert [int(u.id) for u in test] == sorted(int(u.id) for u in test)


def test_random_split_is_deterministic_and_seeded() -> None:
    users, points, _ = _population()
    first = random_split(users, points, seed=5)
    assert first == random_split(users, points, seed=5)
    assert first[1] != random_split(users, points, seed=6)[1]


def test_random_split_samples_clusters_in_proportion() -> None:
    sizes = [200, 100, 50, 50]
    users = _users(sum(sizes))
    _, test = random_split(users, _blobs(sizes), test_size=80, seed=0)
    blob = np.repeat(np.arange(len(sizes)), sizes)
    counts = np.bincount([blob[int(u.id)] for u in test], minlength=len(sizes))
    assert counts.tolist() == [40, 20, 10, 10]


def test_random_split_handles_duplicate_embeddings() -> None:
    users = _users(20)
    points = np.tile([[1.0, 0.0], [0.0, 1.0]], (10, 1))
    train, test = random_split(users, points, test_size=4, seed=0)
    assert len(test) == 4 and len(train) == 16


# --- OOD split -------------------------------------------------------------------------------------------------------

def test_ood_split_takes_the_isolated_group() -> None:
    users, points, isolated = _population()
    train, test = ood_split(users, points, test_size=15, seed=0)
    assert {u.id for u in test} == isolated
    assert {u.id for u in train}.isdisjoint(isolated)


def test_ood_split_fills_up_from_the_next_cluster_exactly() -> None:
    users, points, isolated = _population()
    train, test = ood_split(users, points, test_size=25, seed=0)
    test_ids = {u.id for u in test}
    assert len(test) == 25 and len(train) == len(users) - 25
    assert isolated <= test_ids, "the whole isolated cluster goes to test, so none of it is in train"
    assert {u.id for u in train}.isdisjoint(test_ids)


def test_ood_test_users_are_farther_from_train_than_random_ones() -> None:
    users, points, _ = _population(seed=2)
    ood = ood_split(users, points, test_size=30, seed=0)
    rnd = random_split(users, points, test_size=30, seed=0)
    assert _mean_distance_to_train(users, points, *ood) > 1.5 * _mean_distance_to_train(users, points, *rnd)


def test_ood_split_default_size_and_determinism() -> None:
    users, points, _ = _population()
    train, test = ood_split(users, points, seed=3)
    assert len(test) == round(len(users) * 0.2) and len(train) + len(test) == len(users)
    assert (train, test) == ood_split(users, points, seed=3)


# --- bad input -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", [random_split, ood_split])
def test_embeddings_are_checked(split) -> None:
    users = _users(10)
    with pytest.raises(DataError, match="9 rows but there are 10 users"):
        split(users, np.zeros((9, 4)))
    with pytest.raises(DataError, match="2-D"):
        split(users, np.zeros(10))
    bad = np.ones((10, 4))
    bad[3, 1] = np.nan
    with pytest.raises(DataError, match=r"NaN or infinite values in 1 row\(s\), e.g. rows \[3\]"):
        split(users, bad)
    with pytest.raises(ValueError, match="test_size must be between 1 and 9"):
        split(users, np.eye(10), test_size=10)


def test_swap_histories_gives_every_user_another_users_history_once() -> None:
    users = [User(id=f"u{i}", task="LaMP-2N", profile=(HistoryItem(id=f"h{i}", fields={"text": str(i)}),),
                  queries=(Query(id=f"q{i}", input=f"x{i}"),)) for i in range(7)]
    swapped = swap_histories(users, seed=4)
    assert swapped == swap_histories(users, seed=4) and swapped != swap_histories(users, seed=5)
    assert [u.id for u in swapped] == [u.id for u in users]
    assert [u.queries for u in swapped] == [u.queries for u in users]
    assert all(s.profile != u.profile for s, u in zip(swapped, users))
    assert sorted(s.profile[0].id for s in swapped) == sorted(u.profile[0].id for u in users)
    with pytest.raises(ValueError, match="at least two"):
        swap_histories(users[:1], seed=0)


def test_history_queries_never_see_their_own_or_a_later_item(lamp_dir: Path, tmp_path: Path) -> None:
    """tailor's protocol of more queries per user: the last M items become queries with their own outputs as golds,
    and the history every query is answered from stops before the first of them."""
    from tailor.data.splits import history_queries
    from tailor.eval.runner import run_eval
    from tailor.methods.prompting import RAG, history_of
    from tailor.runs.spec import EvalSpec

    task = get_task("lamp2n")
    for user in load_users(task, "dev", lamp_dir):
        asked = history_queries(user, task, 2)
        assert len(asked.queries) == 1 + min(2, len(user.profile) - 1)
        assert asked.profile == user.profile[:len(asked.profile)]
        for query, item in zip(asked.queries[1:], user.profile[len(asked.profile):]):
            assert query.gold == item["category"] and item["text"] in query.input
    seen: list[tuple[set[str], str]] = []

    class Watching(RAG):
        def prompt(self, state, query_input):  # noqa: ANN001, ANN201 - the method's own signature
            seen.append(({item.id for item in history_of(state)}, query_input))
            return super().prompt(state, query_input)

    spec = EvalSpec(task="lamp2n", method="rag", model=None, data_dir=str(lamp_dir), queries_per_user=2,
                    options={"k": 8})
    from tests.conftest import tiny_backbone

    metrics = run_eval(spec, tmp_path, method=Watching(task, tiny_backbone(), k=8))
    assert metrics["protocol"].startswith("tailor") and metrics["n_queries"] > metrics["n_users"]
    users = {u.id: u for u in load_users(task, "dev", lamp_dir)}
    for history_ids, query_input in seen:
        user = next(u for u in users.values() if any(i in history_ids for i in (it.id for it in u.profile)))
        asked = [i for i, item in enumerate(user.profile) if item["text"] in query_input]
        if asked:  # a history query: nothing from its own item on is in the history it is answered from
            assert not history_ids & {item.id for item in user.profile[asked[0]:]}
    with pytest.raises(ValueError, match="hold only the user's output"):
        EvalSpec(task="lamp7", method="rag", data_dir=str(lamp_dir), queries_per_user=2).check()
