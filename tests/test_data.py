from pathlib import Path

import numpy as np
import pytest

from splitkd.data import edge_split, load_dataset, parse_shard
from splitkd.data.partition import (
    DEMO_PRESUMED_FRACTION,
    Shard,
    cloud_split,
    default_presumed_fraction,
    presumed_split,
    shard_indices,
)
from splitkd.data.specs import DataError


def test_digits_is_the_embedded_image_dataset() -> None:
    data = load_dataset("digits")
    assert data.x.shape == (1797, 1, 8, 8)
    assert data.signature.input_shape == (1, 8, 8)
    assert data.signature.num_classes == 10
    assert data.x.min() >= 0.0 and data.x.max() <= 1.0


def test_npz_and_csv_load_with_class_count_from_the_whole_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((50, 6)), rng.integers(0, 3, 50)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    assert data.signature.input_shape == (6,) and data.signature.num_classes == 3
    rows = "\n".join(",".join(map(str, [*r, int(c)])) for r, c in zip(x, y, strict=True))
    (tmp_path / "d.csv").write_text("a,b,c,d,e,f,label\n" + rows + "\n")
    table = load_dataset(f"csv:{tmp_path / 'd.csv'}")
    np.testing.assert_allclose(table.x, data.x, rtol=1e-6)
    np.testing.assert_array_equal(table.y, data.y)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("mnist", "unknown data spec"),
        ("npz:/nonexistent.npz", "does not exist"),
        ("csv:", "unknown data spec"),
    ],
)
def test_bad_specs_say_why(spec: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_dataset(spec)


def test_bad_files_say_why(tmp_path: Path) -> None:
    np.savez(tmp_path / "noy.npz", x=np.zeros((20, 2)))
    with pytest.raises(DataError, match="needs arrays 'x' and 'y'"):
        load_dataset(f"npz:{tmp_path / 'noy.npz'}")
    np.savez(tmp_path / "neg.npz", x=np.zeros((20, 2)), y=-np.ones(20))
    with pytest.raises(DataError, match=r"label -1\.0 at sample 0 is not a class number"):
        load_dataset(f"npz:{tmp_path / 'neg.npz'}")
    np.savez(tmp_path / "nan.npz", x=np.full((20, 2), np.nan), y=np.zeros(20))
    with pytest.raises(DataError, match="NaN"):
        load_dataset(f"npz:{tmp_path / 'nan.npz'}")
    (tmp_path / "bad.csv").write_text("1,2,0\n1,x,1\n")
    with pytest.raises(DataError, match="line 2, column 2: 'x' is not a number"):
        load_dataset(f"csv:{tmp_path / 'bad.csv'}")
    (tmp_path / "pickle.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"not an \.npz file"):
        load_dataset(f"npz:{tmp_path / 'pickle.npz'}")


def test_object_arrays_are_never_unpickled(tmp_path: Path) -> None:
    x = np.empty(20, dtype=object)
    x[:] = [{"a": i} for i in range(20)]
    np.savez(tmp_path / "obj.npz", x=x, y=np.zeros(20))
    with pytest.raises(DataError, match="holds Python objects; splitkd never unpickles"):
        load_dataset(f"npz:{tmp_path / 'obj.npz'}")


@pytest.mark.parametrize("text", ["1", "a/b", "2/2", "-1/2", "0/0"])
def test_bad_shards_are_refused(text: str) -> None:
    with pytest.raises(DataError):
        parse_shard(text)


def test_partition_is_deterministic_and_disjoint() -> None:
    data = load_dataset("digits")
    cloud, pool = presumed_split(len(data), DEMO_PRESUMED_FRACTION)
    assert not set(cloud) & set(pool) and len(cloud) + len(pool) == len(data)
    splits = [
        edge_split(data, Shard(i, 3), presumed_fraction=DEMO_PRESUMED_FRACTION) for i in range(3)
    ]
    again = edge_split(data, Shard(1, 3), presumed_fraction=DEMO_PRESUMED_FRACTION)
    np.testing.assert_array_equal(again.train.x, splits[1].train.x)
    seen: set[bytes] = set()
    for split in splits:
        for part in (split.train, split.heldout):
            keys = {row.tobytes() for row in part.x}
            assert not keys & seen  # an edge's samples appear nowhere else
            seen |= keys
    teacher = cloud_split(data, DEMO_PRESUMED_FRACTION)
    assert not {row.tobytes() for row in teacher.train.x} & seen


def test_dirichlet_shards_are_skewed_and_cover_the_pool() -> None:
    data = load_dataset("digits")
    _, pool = presumed_split(len(data), DEMO_PRESUMED_FRACTION)
    shards = [shard_indices(data.y, pool, Shard(i, 4), alpha=0.1) for i in range(4)]
    assert sorted(np.concatenate(shards).tolist()) == sorted(pool.tolist())
    iid = shard_indices(data.y, pool, Shard(0, 4), alpha=None)

    def top_class_share(index: np.ndarray) -> float:
        return float(np.bincount(data.y[index]).max() / len(index))

    assert max(top_class_share(s) for s in shards if len(s)) > 2 * top_class_share(iid)


def _tabular(tmp_path: Path, n: int = 100, classes: int = 3) -> str:
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "own.npz", x=rng.standard_normal((n, 4)), y=rng.integers(0, classes, n))
    return f"npz:{tmp_path / 'own.npz'}"


def test_a_users_file_is_used_whole_by_default_and_digits_keeps_the_demo_split(
    tmp_path: Path,
) -> None:
    spec = _tabular(tmp_path)
    assert default_presumed_fraction(spec) == 0.0
    assert default_presumed_fraction("digits") == DEMO_PRESUMED_FRACTION
    data = load_dataset(spec)
    edge = edge_split(data, presumed_fraction=default_presumed_fraction(spec))
    assert edge.sample_counts() == {"train": 80, "heldout": 20, "set_aside": 0, "other_shards": 0}
    teacher = cloud_split(data, default_presumed_fraction(spec))
    assert teacher.sample_counts() == {
        "train": 80,
        "heldout": 20,
        "set_aside": 0,
        "other_shards": 0,
    }
    # The demo's split, asked for: 40 % for the cloud, the rest in shards.
    demo = edge_split(load_dataset("digits"), Shard(0, 2), presumed_fraction=0.4)
    counts = demo.sample_counts()
    assert counts["set_aside"] == round(1797 * 0.4)
    assert sum(counts.values()) == 1797


def test_a_csv_with_a_byte_order_mark_keeps_its_first_row(tmp_path: Path) -> None:
    rows = [f"{i}.5,{i % 3}" for i in range(12)]
    (tmp_path / "bom.csv").write_text("\n".join(rows) + "\n", encoding="utf-8-sig")
    data = load_dataset(f"csv:{tmp_path / 'bom.csv'}")
    assert len(data) == 12 and data.x[0, 0] == 0.5


def test_a_header_is_a_row_of_names_and_a_single_bad_cell_is_named(tmp_path: Path) -> None:
    body = "".join(f"{i},{i * 2},{i % 2}\n" for i in range(12))
    (tmp_path / "header.csv").write_text("width,height,label\n" + body)
    assert len(load_dataset(f"csv:{tmp_path / 'header.csv'}")) == 12
    (tmp_path / "typo.csv").write_text("1,2x,0\n" + body)
    with pytest.raises(DataError, match=r"line 1, column 2: '2x' is not a number"):
        load_dataset(f"csv:{tmp_path / 'typo.csv'}")


def test_labels_that_are_not_class_numbers_are_reported_as_given(tmp_path: Path) -> None:
    body = "".join(f"{i},{i % 2}\n" for i in range(12))
    (tmp_path / "big.csv").write_text(body + "3,1e20\n")
    with pytest.raises(DataError, match=r"label 1e\+20 at line 13 is not a class number"):
        load_dataset(f"csv:{tmp_path / 'big.csv'}")
    np.savez(tmp_path / "u.npz", x=np.zeros((12, 2)), y=np.array([0] * 11 + [2**63], np.uint64))
    with pytest.raises(DataError, match="label 9223372036854775808 at sample 11"):
        load_dataset(f"npz:{tmp_path / 'u.npz'}")


def test_a_device_whose_labels_are_all_zero_still_has_a_two_class_signature(
    tmp_path: Path,
) -> None:
    np.savez(tmp_path / "zeros.npz", x=np.ones((12, 2)), y=np.zeros(12, dtype=np.int64))
    assert load_dataset(f"npz:{tmp_path / 'zeros.npz'}").signature.num_classes == 2
